"""How the model was trained: checkpoints, learning rates, step counts, stages, and segments.

A :class:`Trajectory` lists checkpoints in training order. Checkpoint c records the optimizer
steps taken since checkpoint c - 1 (since initialisation for the first one) and their learning
rate(s); it stands for those steps when the run is cut into segments. SOURCE averages
gradients and Hessians over the checkpoints of each :class:`Segment`, and uses the segment's
step count K and mean effective learning rate eta (eta / (1 - beta) under heavy-ball momentum).

Adam and AdamW runs ("adam", "adamw") also carry each checkpoint's optimizer state, from which
``optimizer_state.Preconditioner`` builds Adam's diagonal preconditioner D at that checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from source_proj.errors import InputError

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
# Optimizers with a diagonal preconditioner read from each checkpoint's optimizer state.
PRECONDITIONED = ("adam", "adamw")


class TrajectoryError(InputError):
    """A trajectory or checkpoint that cannot describe a training run."""


@dataclass(frozen=True)
class Checkpoint:
    """One saved point of training.

    Attributes:
        state: the model's state dict, or a path: a file saved with ``torch.save`` (``.pt``,
            ``pytorch_model.bin``), a ``.safetensors`` file, a sharded checkpoint's
            ``*.index.json``, or a directory written by ``save_pretrained`` or a Hugging Face
            ``Trainer`` (``checkpoint-*/``); see :func:`load_state_file`.
        steps: optimizer steps since the previous checkpoint (> 0).
        lr: the learning rate of those steps, or a per-step history of length ``steps``
            (``lr_history.LearningRateRecorder`` records one; single steps may have rate 0).
        stage: label of the training stage the steps belong to (stages must be contiguous).
        optimizer_state: the optimizer's state at this checkpoint, required for "adam" /
            "adamw" trajectories (and refused for others): a ``torch.optim`` optimizer
            ``state_dict()`` (parameters by index, see ``Trajectory.param_order``), a path to
            one saved with ``torch.save`` (e.g. the ``optimizer.pt`` Hugging Face's Trainer
            writes beside each checkpoint), or a mapping parameter name -> ``exp_avg_sq``
            tensor (the bias correction then uses the trajectory's cumulative step count at
            this checkpoint). A ``state_dict``'s step counts must fit the checkpoints' ``steps``
            (``optimizer_state.check_step_counts``: states swapped between checkpoints are refused).
    """

    state: Mapping[str, torch.Tensor] | str | os.PathLike
    steps: int
    lr: float | Sequence[float]
    stage: Hashable = 0
    optimizer_state: Mapping[str, Any] | str | os.PathLike | None = None

    def lr_sum(self) -> float:
        """Sum of the learning rates over the checkpoint's steps."""
        if isinstance(self.lr, (int, float)):
            return float(self.lr) * self.steps
        return float(np.sum(np.asarray(self.lr, dtype=np.float64)))

    def load(self) -> Mapping[str, torch.Tensor]:
        """The state dict (loaded on the CPU if ``state`` is a path)."""
        if isinstance(self.state, Mapping):
            return self.state
        return load_state_file(self.state)

    def identity(self) -> tuple | None:
        """What must be unchanged for a state loaded from ``state`` to still be its contents:
        per file of :func:`state_files`, its device, inode, size and modification and change
        times (any write or ``utime`` sets the change time, which cannot be set back); None
        for a state given as a mapping. Raises TrajectoryError naming a file that cannot be
        examined."""
        if isinstance(self.state, Mapping):
            return None
        out = []
        for file in state_files(self.state):
            try:
                found = file.stat()
            except OSError as exc:
                raise TrajectoryError(f"could not examine checkpoint file {os.fspath(file)!r}: {exc}") from exc
            out.append((os.fspath(file), found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns, found.st_ctime_ns))
        return tuple(out)


# Model weight files of a save_pretrained / Trainer checkpoint directory, in order of preference.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def load_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict (CPU tensors, keys as saved) from a ``torch.save`` file, a
    ``.safetensors`` file (needs the ``safetensors`` package), a sharded checkpoint's
    ``*.index.json`` (its shards merged) or a directory holding one of ``WEIGHT_FILES``.

    Raises TrajectoryError naming the path if nothing loadable is there.
    """
    files = state_files(path)
    state: dict[str, torch.Tensor] = {}
    for file in files[1:] if files[0].name.endswith(".index.json") else files:
        try:
            if file.suffix == ".safetensors":
                from safetensors.torch import load_file

                state.update(load_file(file, device="cpu"))
            else:
                state.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
        except Exception as exc:
            raise TrajectoryError(f"could not load checkpoint file {os.fspath(file)!r}: {exc}") from exc
    return state


def state_files(path: str | os.PathLike) -> list[Path]:
    """The files :func:`load_state_file` reads for ``path``: the weight file (the first of
    ``WEIGHT_FILES`` in a directory), or a sharded checkpoint's index followed by its shards.
    What identifies a checkpoint on disk."""
    path = Path(path)
    if path.is_dir():
        found = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)
        if found is None:
            raise TrajectoryError(
                f"checkpoint directory {os.fspath(path)!r} holds none of the weight files {list(WEIGHT_FILES)}"
            )
        return state_files(found)
    if path.name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise TrajectoryError(f"could not read checkpoint index {os.fspath(path)!r}: {exc}") from exc
        return [path, *(path.parent / shard for shard in shards)]
    return [path]


def _check_checkpoint(index: int, ckpt: Checkpoint) -> None:
    if isinstance(ckpt.steps, bool) or not isinstance(ckpt.steps, (int, np.integer)) or ckpt.steps <= 0:
        raise TrajectoryError(f"checkpoint {index}: steps must be a positive int, got {ckpt.steps!r}")
    if isinstance(ckpt.lr, (int, float)):
        if not (math.isfinite(ckpt.lr) and ckpt.lr > 0):
            raise TrajectoryError(f"checkpoint {index}: learning rates must be finite and > 0, got {ckpt.lr!r}")
        return
    rates = np.asarray(ckpt.lr, dtype=np.float64)
    if rates.shape != (ckpt.steps,):
        raise TrajectoryError(
            f"checkpoint {index}: a learning-rate history must have one rate per step "
            f"({ckpt.steps}), got shape {rates.shape}"
        )
    # Zero-rate steps occur (a warm-up that starts at 0); a checkpoint's steps must move, though.
    if not np.all(np.isfinite(rates)) or np.any(rates < 0) or rates.sum() <= 0:
        raise TrajectoryError(
            f"checkpoint {index}: learning rates must be finite and > 0 (single steps of a history "
            f"may be 0), got {ckpt.lr!r}"
        )


@dataclass(frozen=True)
class Segment:
    """A stretch of training treated as stationary.

    Attributes:
        stage: the stage the segment lies in.
        checkpoints: indices (into the trajectory) of the checkpoints it averages over.
        steps: K, the number of optimizer steps it covers.
        lr: eta, the mean effective learning rate over those steps.
    """

    stage: Hashable
    checkpoints: tuple[int, ...]
    steps: int
    lr: float

    @property
    def time(self) -> float:
        """t = eta * K, the segment's time scale (units of learning rate x steps)."""
        return self.lr * self.steps


@dataclass(frozen=True)
class Trajectory:
    """Ordered checkpoints and the optimizer settings of the run.

    Attributes:
        checkpoints: the checkpoints in training order (the last is the final model).
        optimizer: "sgd", "momentum" (heavy-ball SGD, as ``torch.optim.SGD(momentum=beta)``),
            "adam" (``torch.optim.Adam``: weight decay is an L2 term added to the gradient
            before preconditioning) or "adamw" (``torch.optim.AdamW``: decoupled decay
            theta <- theta - eta * lambda * theta). Adam runs need every checkpoint's
            ``optimizer_state``.
        momentum: beta, in [0, 1); must be 0 for "sgd" and for Adam (whose beta1 is in ``betas``).
        weight_decay: lambda: the L2 coefficient added to the gradient (lambda * theta) for
            "sgd", "momentum" and "adam"; the decoupled decay rate for "adamw". Adam states
            given as ``state_dict``s must agree: their param groups' parameter-weighted mean
            decay (checked to 0.1%).
        betas: Adam's (beta1, beta2), each in [0, 1) (used by "adam" / "adamw" only).
        eps: Adam's eps (> 0), added to sqrt(v_hat) in the denominator.
        param_order: the attributed model's parameter names in the order they were given to
            the optimizer: a flat sequence, or one sequence per param group. It maps the
            integer parameter ids of an optimizer ``state_dict()`` to names. Default (None):
            ``model.named_parameters()`` order (shared tensors once), one group.
    """

    checkpoints: tuple[Checkpoint, ...]
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    param_order: Sequence[str] | Sequence[Sequence[str]] | None = None
    _stages: tuple[Hashable, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "checkpoints", tuple(self.checkpoints))
        if not self.checkpoints:
            raise TrajectoryError("a trajectory needs at least one checkpoint")
        for i, ckpt in enumerate(self.checkpoints):
            if not isinstance(ckpt, Checkpoint):
                raise TrajectoryError(f"checkpoint {i} is a {type(ckpt).__name__}, not a Checkpoint")
            _check_checkpoint(i, ckpt)
        if self.optimizer not in OPTIMIZERS:
            raise TrajectoryError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not (0.0 <= self.momentum < 1.0) or (self.optimizer == "sgd" and self.momentum != 0.0):
            raise TrajectoryError(
                f"momentum must be in [0, 1) and 0 for plain 'sgd'; got {self.momentum} with {self.optimizer!r}"
            )
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0.0):
            raise TrajectoryError(f"weight_decay must be finite and >= 0, got {self.weight_decay}")
        self._check_preconditioner_settings()
        stages: list[Hashable] = []
        for i, ckpt in enumerate(self.checkpoints):
            if not stages or stages[-1] != ckpt.stage:
                if ckpt.stage in stages:
                    raise TrajectoryError(
                        f"checkpoint {i}: stage {ckpt.stage!r} resumes after another stage; "
                        "a stage's checkpoints must be contiguous"
                    )
                stages.append(ckpt.stage)
        object.__setattr__(self, "_stages", tuple(stages))

    def _check_preconditioner_settings(self) -> None:
        betas = tuple(float(b) for b in self.betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise TrajectoryError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", betas)
        if not (math.isfinite(self.eps) and self.eps > 0.0):
            raise TrajectoryError(f"eps must be finite and > 0, got {self.eps!r}")
        if self.param_order is not None:
            object.__setattr__(self, "param_order", _normalise_param_order(self.param_order))
        preconditioned = self.preconditioned
        if preconditioned and self.momentum != 0.0:
            raise TrajectoryError(
                f"momentum must be 0 for {self.optimizer!r} (Adam's first-moment decay is betas[0]), "
                f"got {self.momentum}"
            )
        for i, ckpt in enumerate(self.checkpoints):
            if preconditioned and ckpt.optimizer_state is None:
                raise TrajectoryError(
                    f"checkpoint {i}: optimizer {self.optimizer!r} needs the optimizer state of every "
                    "checkpoint (Checkpoint(optimizer_state=...): a state_dict, a path to optimizer.pt, "
                    "or a mapping name -> exp_avg_sq)"
                )
            if not preconditioned and ckpt.optimizer_state is not None:
                raise TrajectoryError(
                    f"checkpoint {i} has an optimizer_state, which optimizer {self.optimizer!r} does not "
                    "use; use optimizer='adam' or 'adamw' for Adam runs, or leave it out"
                )

    @property
    def preconditioned(self) -> bool:
        """Whether the optimizer has Adam's diagonal preconditioner ("adam", "adamw")."""
        return self.optimizer in PRECONDITIONED

    def cumulative_steps(self, index: int) -> int:
        """Optimizer steps from the start of the trajectory up to checkpoint ``index`` (the
        run's absolute step only when the trajectory starts at the run's start)."""
        return sum(int(c.steps) for c in self.checkpoints[: index + 1])

    @property
    def stages(self) -> tuple[Hashable, ...]:
        """Stage labels in training order."""
        return self._stages

    def stage_checkpoints(self, stage: Hashable) -> list[int]:
        """Indices of the checkpoints of ``stage``."""
        if stage not in self._stages:
            raise TrajectoryError(f"unknown stage {stage!r}; the trajectory has stages {list(self._stages)}")
        return [i for i, c in enumerate(self.checkpoints) if c.stage == stage]

    def segments(
        self, num_segments: int = 3, momentum_factor: bool = True, time_scale: float = 1.0
    ) -> tuple[Segment, ...]:
        """Cut each stage into ``num_segments`` stretches of (nearly) equal checkpoint counts.

        Args:
            num_segments: L, segments per stage (>= 1, at most the stage's checkpoint count).
            momentum_factor: use the effective rate eta / (1 - beta) under momentum.
            time_scale: multiplies every segment's rate, hence its time t = eta K.
        """
        if isinstance(num_segments, bool) or not isinstance(num_segments, int) or num_segments < 1:
            raise TrajectoryError(f"num_segments must be a positive int, got {num_segments!r}")
        factor = time_scale / (1.0 - self.momentum) if momentum_factor else time_scale
        out = []
        for stage in self._stages:
            indices = self.stage_checkpoints(stage)
            if num_segments > len(indices):
                raise TrajectoryError(
                    f"num_segments={num_segments} is larger than the {len(indices)} checkpoint(s) "
                    f"of stage {stage!r}"
                )
            for part in np.array_split(np.asarray(indices), num_segments):
                ckpts = [self.checkpoints[i] for i in part]
                steps = sum(int(c.steps) for c in ckpts)
                lr = factor * sum(c.lr_sum() for c in ckpts) / steps
                out.append(Segment(stage, tuple(int(i) for i in part), steps, lr))
        return tuple(out)

    def summary(self) -> dict:
        """A JSON-serialisable description of the schedule (no tensors, no file paths: the
        checkpoints' contents are fingerprinted separately, see ``digests``)."""
        out: dict = {
            "optimizer": self.optimizer,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "checkpoints": [
                {"steps": int(c.steps), "lr_sum": c.lr_sum(), "stage": str(c.stage)} for c in self.checkpoints
            ],
        }
        if self.preconditioned:  # the optimizer states themselves are digested separately
            out.update(betas=list(self.betas), eps=self.eps)
        return out


def _normalise_param_order(order: Sequence[str] | Sequence[Sequence[str]]) -> tuple:
    """A flat tuple of names, or a tuple of per-group tuples; raises on anything else."""
    if isinstance(order, (str, bytes)) or not isinstance(order, Sequence) or not order:
        raise TrajectoryError(f"param_order must be a non-empty sequence of names or of name groups, got {order!r}")
    grouped = not isinstance(order[0], str)
    groups = [tuple(g) for g in order] if grouped else [tuple(order)]
    names = [n for g in groups for n in g if isinstance(n, str)]
    if len(names) != sum(len(g) for g in groups):
        raise TrajectoryError("param_order must hold parameter names (str), or one sequence of names per param group")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise TrajectoryError(f"param_order names parameters more than once: {repeated}")
    return tuple(groups) if grouped else groups[0]
