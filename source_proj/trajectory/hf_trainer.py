"""The :class:`Trajectory` of a Hugging Face ``Trainer`` run, from its output directory.

    trajectory = trainer_trajectory("out/")          # out/checkpoint-*/ as the Trainer left them

Each ``checkpoint-<step>/`` folder becomes a :class:`Checkpoint` whose state is the folder
itself (``model.safetensors`` or ``pytorch_model.bin``, sharded or not; a tied head's key may
be absent, see ``gradients.model``), whose ``steps`` are the optimizer steps since the
previous saved checkpoint (``global_step`` of ``trainer_state.json``), and whose learning
rates are the per-step rates of those steps. Folders the Trainer deleted
(``save_total_limit``) simply merge their steps into the next kept checkpoint.

Learning rates. Exact where ``trainer_state.json`` logged every step (``logging_steps=1``);
otherwise each missing step's rate is interpolated linearly between the known ones: the
logged rates and, from each checkpoint's ``scheduler.pt``, the rate of the step after it
(exact for constant and linear schedules, an approximation for others, which a warning says).
Which step a logged rate belongs to is checked against ``scheduler.pt`` (Trainer versions
differ: the rate used at that step, or the one after it). ``learning_rates=`` overrides all
of this with a recorded per-step history.

Optimizer. Read from ``optimizer.pt``'s parameter groups (no unpickling of training
arguments): ``torch.optim.SGD`` (``optim="sgd"``) gives "sgd" or "momentum" with its weight
decay. The Trainer puts biases and normalisation weights in a group without weight decay;
the trajectory then carries the parameter-weighted mean decay (exact when all groups agree;
otherwise an approximation of the per-parameter decay, with a warning). ``torch.optim.Adam``
/ ``AdamW`` runs (``optim="adamw_torch"``, the Trainer's default) give "adam" / "adamw" with
their betas and eps, every checkpoint's ``optimizer.pt`` as its optimizer state, and the
Trainer's two param groups (``trainer_param_order``) as the trajectory's ``param_order``, so
SOURCE uses Adam's preconditioner (``trajectory.optimizer_state``); ``model=`` is then
required.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from source_proj.trajectory.checkpoints import Checkpoint, Trajectory, TrajectoryError
from source_proj.trajectory.optimizer_state import (
    group_decays,
    mean_group_decay,
    state_sizes,
)

_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class OptimizerSettings:
    """What ``optimizer.pt`` says about the run's optimizer.

    Attributes:
        kind: "sgd", "momentum", "adam" or "adamw".
        momentum: SGD's heavy-ball beta (0 for Adam).
        weight_decay: the parameter-weighted mean decay over the groups.
        group_decays: each group's (number of parameters, weight decay).
        betas, eps: Adam's settings (None for SGD).
    """

    kind: str
    momentum: float
    weight_decay: float
    group_decays: tuple[tuple[int, float], ...]
    betas: tuple[float, float] | None = None
    eps: float | None = None


def checkpoint_folders(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(global step, folder) of every ``checkpoint-<step>/`` in ``output_dir``, by step."""
    root = Path(output_dir)
    if not root.is_dir():
        raise TrajectoryError(f"Trainer output directory {os.fspath(root)!r} does not exist")
    found = sorted(
        (int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT_DIR.match(p.name))
    )
    if not found:
        raise TrajectoryError(f"{os.fspath(root)!r} holds no checkpoint-<step>/ folders of a Trainer run")
    return found


def _trainer_state(folder: Path) -> dict:
    path = folder / "trainer_state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TrajectoryError(f"cannot read {os.fspath(path)!r}: {exc}") from exc


def _next_rate(folder: Path) -> float | None:
    """The rate of the step after this checkpoint, from its ``scheduler.pt`` (None if absent)."""
    path = folder / "scheduler.pt"
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    rates = state.get("_last_lr")
    return float(rates[0]) if rates else None


def step_learning_rates(log_history: Sequence[dict], next_rates: dict[int, float], total_steps: int) -> tuple[np.ndarray, bool]:
    """Per-step learning rates (total_steps,) float64 and whether they are all exact.

    Args:
        log_history: ``trainer_state.json``'s entries (those with ``learning_rate``).
        next_rates: global step s -> the rate of step s + 1 (from ``scheduler.pt``).
        total_steps: the last step.
    """
    logged = {int(e["step"]): float(e["learning_rate"]) for e in log_history if "learning_rate" in e and "step" in e}
    # Rates logged at step s are the rate used at s (shift 0) or at s + 1 (shift 1):
    # scheduler.pt, which gives the rate of s + 1, tells which.
    votes = {0: 0, 1: 0}
    for s, rate in next_rates.items():
        for shift, step in ((0, s + 1), (1, s)):
            if step in logged and math.isclose(logged[step], rate, rel_tol=1e-9, abs_tol=1e-15):
                votes[shift] += 1
    shift = 1 if votes[1] > votes[0] else 0
    known = {s + shift: r for s, r in logged.items()}
    known.update({s + 1: r for s, r in next_rates.items()})
    if not known:
        raise TrajectoryError("the Trainer run recorded no learning rates (no log_history entries, no scheduler.pt)")
    # Every known rate anchors the interpolation (the last scheduler's, of step total + 1, too).
    steps = np.arange(1, total_steps + 1)
    points = np.array(sorted(known))
    rates = np.interp(steps, points, np.array([known[s] for s in points]))
    return rates, all(int(s) in known for s in steps)


def trainer_param_order(model: torch.nn.Module) -> list[list[str]]:
    """The parameter names of each optimizer group as ``Trainer.create_optimizer`` forms them:
    [names with weight decay, names without], in ``named_parameters()`` order (needs
    ``transformers``). The integer ids of ``optimizer.pt`` index this order."""
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return [[n for n in names if n in decay], [n for n in names if n not in decay]]


def optimizer_settings(folder: Path, model: torch.nn.Module | None = None) -> OptimizerSettings:
    """The optimizer of a checkpoint folder's ``optimizer.pt`` (see the module docstring).
    ``model`` gives the groups' sizes when the optimizer keeps no per-parameter state (plain
    SGD) and the groups' weight decays differ."""
    path = folder / "optimizer.pt"
    if not path.is_file():
        raise TrajectoryError(f"{os.fspath(folder)!r} has no optimizer.pt to read the optimizer from")
    state = torch.load(path, map_location="cpu", weights_only=True)
    groups = state["param_groups"]
    decays = [float(g.get("weight_decay", 0.0)) for g in groups]
    sizes = state_sizes(state.get("state", {}))
    if len(set(decays)) > 1 and any(pid not in sizes for g in groups for pid in g["params"]):
        if model is None:
            raise TrajectoryError(
                f"{os.fspath(path)}: the parameter groups decay differently ({decays}) and the optimizer keeps "
                "no state to size them: pass model= to weigh their decays"
            )
        shapes = dict(model.named_parameters())
        order = [n for group in trainer_param_order(model) for n in group]
        sizes = {i: shapes[n].numel() for i, n in enumerate(order)}
    counted = group_decays(groups, sizes)
    mean_decay = mean_group_decay(counted)
    first = groups[0]
    if "betas" in first:
        kind = "adamw" if first.get("decoupled_weight_decay", False) else "adam"
        return OptimizerSettings(kind, 0.0, mean_decay, counted, tuple(first["betas"]), float(first["eps"]))
    if "momentum" in first:
        if first.get("nesterov") or first.get("dampening", 0):
            raise TrajectoryError(f"{os.fspath(path)}: SGD with nesterov or dampening is not supported")
        momentum = float(first["momentum"])
        return OptimizerSettings("momentum" if momentum > 0 else "sgd", momentum, mean_decay, counted)
    raise TrajectoryError(f"{os.fspath(path)}: unsupported optimizer (parameter group keys {sorted(first)})")


def trainer_trajectory(
    output_dir: str | os.PathLike,
    *,
    stage: Hashable = 0,
    learning_rates: Sequence[float] | None = None,
    model: torch.nn.Module | None = None,
) -> Trajectory:
    """The trajectory of the Trainer run in ``output_dir`` (see the module docstring).

    Args:
        output_dir: the Trainer's ``output_dir`` holding ``checkpoint-<step>/`` folders.
        stage: the stage label of all its checkpoints.
        learning_rates: the per-step rates of the whole run (length = the last global step),
            instead of those read from the logs and schedulers.
        model: the trained architecture; needed for Adam/AdamW runs (to name the optimizer
            states' parameters) and to size parameter groups whose weight decays differ when
            the optimizer kept no per-parameter state.
    """
    folders = checkpoint_folders(output_dir)
    last_step, last = folders[-1]
    state = _trainer_state(last)
    if int(state.get("global_step", last_step)) != last_step:
        raise TrajectoryError(f"{os.fspath(last)}: trainer_state.json says global_step {state.get('global_step')}")
    if learning_rates is None:
        next_rates = {s: r for s, f in folders if (r := _next_rate(f)) is not None}
        rates, exact = step_learning_rates(state.get("log_history", []), next_rates, last_step)
        if not exact:
            warnings.warn(
                f"{os.fspath(output_dir)}: learning rates were logged for only some steps; the others are "
                "interpolated linearly (exact for constant and linear schedules). Train with logging_steps=1, "
                "or pass learning_rates=, for exact rates.",
                stacklevel=2,
            )
    else:
        rates = np.asarray(learning_rates, dtype=np.float64)
        if rates.shape != (last_step,):
            raise TrajectoryError(f"learning_rates must have one rate per step ({last_step}), got shape {rates.shape}")
    settings = optimizer_settings(last, model)
    adam = settings.kind in ("adam", "adamw")
    if adam and model is None:
        raise TrajectoryError(
            f"{os.fspath(output_dir)} is an {settings.kind} run: pass model= (the trained architecture) so that "
            "the optimizer states' parameter ids can be mapped to parameter names (the Trainer's param groups)"
        )
    if len({d for _, d in settings.group_decays}) > 1:
        warnings.warn(
            f"{os.fspath(output_dir)}: parameter groups decay differently {list(settings.group_decays)}; the "
            f"trajectory uses the parameter-weighted mean {settings.weight_decay:g}",
            stacklevel=2,
        )
    checkpoints, previous = [], 0
    for step, folder in folders:
        history = [float(r) for r in rates[previous:step]]
        state = str(folder / "optimizer.pt") if adam else None
        if adam and not (folder / "optimizer.pt").is_file():
            raise TrajectoryError(f"{os.fspath(folder)!r} has no optimizer.pt: an {settings.kind} run needs every "
                                  "checkpoint's optimizer state (Trainer(save_only_model=False))")
        checkpoints.append(Checkpoint(str(folder), steps=step - previous, lr=history, stage=stage, optimizer_state=state))
        previous = step
    if adam:
        return Trajectory(
            tuple(checkpoints), optimizer=settings.kind, weight_decay=settings.weight_decay, betas=settings.betas,
            eps=settings.eps, param_order=tuple(tuple(g) for g in trainer_param_order(model)),
        )
    return Trajectory(
        tuple(checkpoints), optimizer=settings.kind, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
