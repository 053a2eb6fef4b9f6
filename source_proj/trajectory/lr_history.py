"""Recording the learning rate of every optimizer step, for ``Checkpoint(lr=[...])``.

SOURCE needs the learning rate of each step a checkpoint stands for. With a schedule
(warm-up, cosine, ``torch.optim.lr_scheduler``, Hugging Face's schedulers) that is a per-step
history. Two ways to get it without rebuilding it by hand:

* during training, :class:`LearningRateRecorder` hooks the optimizer and records the rate
  each ``optimizer.step()`` used; :meth:`LearningRateRecorder.take` returns the rates since
  the previous checkpoint::

      recorder = LearningRateRecorder(optimizer)
      ...  # training loop: optimizer.step(); scheduler.step()
      checkpoints.append(Checkpoint(state, steps=len(r := recorder.take()), lr=r,
                                    optimizer_state=optimizer.state_dict()))

* after training, :func:`scheduled_rates` (:func:`scheduled_group_rates` for several param
  groups) replays a scheduler on a dummy optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from source_proj.errors import InputError


class LearningRateRecorder:
    """Records, before every ``optimizer.step()``, the learning rate that step uses.

    Args:
        optimizer: the training run's optimizer (any ``torch.optim.Optimizer``).
        group: the param group whose rate is recorded. None (default): all groups must share
            one rate (otherwise :meth:`take` raises, since one rate per step is what a
            trajectory describes).

    Use as a context manager, or call :meth:`close`, to remove the hook.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, group: int | None = None) -> None:
        if group is not None and not 0 <= group < len(optimizer.param_groups):
            groups = len(optimizer.param_groups)
            raise InputError(f"group {group} out of range: the optimizer has {groups} param groups")
        self.optimizer = optimizer
        self.group = group
        self._rates: list[tuple[float, ...]] = []
        self._mismatch: tuple[int, list[float]] | None = None
        self._steps = 0
        self._handle = optimizer.register_step_pre_hook(self._record)

    def _record(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        rates = [float(g["lr"]) for g in optimizer.param_groups]
        differ = any(not math.isclose(r, rates[0]) for r in rates)
        if self.group is None and self._mismatch is None and differ:
            self._mismatch = (self._steps, rates)
        self._rates.append(tuple(rates))
        self._steps += 1

    @property
    def steps(self) -> int:
        """Optimizer steps recorded since the recorder was created."""
        return self._steps

    def take(self) -> tuple[float, ...]:
        """The rates of the steps since the previous ``take`` (or since creation), one per step."""
        if self._mismatch is not None:
            step, rates = self._mismatch
            raise InputError(
                f"optimizer step {step} used different learning rates per param group ({rates}); "
                "a trajectory has one rate per step: pass group=... to record one group's rate"
            )
        return tuple(rates[self.group or 0] for rates in self.take_groups())

    def take_groups(self) -> tuple[tuple[float, ...], ...]:
        """Every param group's rate of each step since the previous take, one tuple per step."""
        rates, self._rates = tuple(self._rates), []
        return rates

    def close(self) -> None:
        """Remove the hook from the optimizer."""
        self._handle.remove()

    def __enter__(self) -> LearningRateRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def scheduled_rates(
    make_scheduler: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler], lr: float, steps: int
) -> tuple[float, ...]:
    """The learning rates of ``steps`` optimizer steps under a scheduler stepped once per
    optimizer step (as Hugging Face's Trainer does), replayed without training.

    Args:
        make_scheduler: builds the scheduler on the optimizer it is given, e.g.
            ``lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=1000)``.
        lr: the optimizer's base learning rate.
        steps: number of optimizer steps.
    """
    return tuple(rates[0] for rates in scheduled_group_rates(make_scheduler, [lr], steps))


def scheduled_group_rates(
    make_scheduler: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler],
    lrs: Sequence[float],
    steps: int,
) -> tuple[tuple[float, ...], ...]:
    """As :func:`scheduled_rates` for an optimizer of ``len(lrs)`` param groups with base rates
    ``lrs``: every group's rate of each step, one tuple per step."""
    if steps < 0:
        raise InputError(f"steps must be >= 0, got {steps}")
    optimizer = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": lr} for lr in lrs])
    scheduler = make_scheduler(optimizer)
    with LearningRateRecorder(optimizer) as recorder:
        for _ in range(steps):
            optimizer.step()  # no gradient: a no-op that the recorder sees
            scheduler.step()
        return recorder.take_groups()
