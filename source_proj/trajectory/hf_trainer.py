"""The :class:`Trajectory` of a Hugging Face ``Trainer`` run, from its output directory.

    trajectory = trainer_trajectory("out/")          # out/checkpoint-*/ as the Trainer left them

Each ``checkpoint-<step>/`` folder becomes a :class:`Checkpoint` whose state is the folder
itself (``model.safetensors`` or ``pytorch_model.bin``, sharded or not; a tied head's key may
be absent, see ``gradients.model``), whose ``steps`` are the optimizer steps since the
previous saved checkpoint (``global_step`` of ``trainer_state.json``), and whose learning
rates are the per-step rates of those steps. Folders the Trainer deleted
(``save_total_limit``) simply merge their steps into the next kept checkpoint.

Integrity. Every folder's ``trainer_state.json`` is read: its ``global_step`` must be the
number in the folder's name, and its ``log_history`` and run settings (``max_steps``, batch
size, logging and save intervals) must agree with the last folder's, as must its
``training_args.bin`` schedule and its :class:`SourceRecordCallback` record; otherwise the
folder (renamed, or copied from another run) is refused by name. A file that cannot be read
(truncated ``scheduler.pt``, ``optimizer.pt``, ``training_args.bin``, bad JSON) is a
:class:`TrajectoryError` naming it.

Learning rates, in order of preference:

1. the record of :class:`SourceRecordCallback` (``source_record.json`` in the last folder),
   written during training: every step's rate as the optimizer used it;
2. the schedule replayed from ``training_args.bin`` (scheduler type, learning rate, warm-up,
   scheduler kwargs; total steps = ``max_steps`` of ``trainer_state.json``) with
   ``transformers.get_scheduler`` on a dummy optimizer, as ``Trainer.create_scheduler``
   builds it. ``training_args.bin`` is a pickle: it is read by an unpickler that builds
   stand-ins for every class it names and runs none of their code;
3. only where neither exists: the logged rates and, from each checkpoint's ``scheduler.pt``,
   the rate of the step after it, interpolated linearly between those steps and held
   constant before the first and after the last (a warning says which steps are not exact).

Rates from 1. or 2. are checked against every logged rate of ``log_history`` (Trainer versions
log the rate used at that step or the one after it: whichever fits) and every ``scheduler.pt``
(the rate after its step; for the replay also that the scheduler was stepped once per step):
a disagreement beyond float rounding is a :class:`TrajectoryError` naming the step and both
values. ``learning_rates=`` overrides all of this with a recorded per-step history. Where the
param groups' rates differ (per-group learning rates), the trajectory takes group 0's (the
Trainer's weight-decayed group) and a warning gives the others.

Loss reduction. The Trainer minimises the mean token loss of a batch;
:func:`trainer_loss_reduction` gives the :class:`~source_proj.gradients.causal_lm.CausalLMTask`
reduction that matches it.

Optimizer. Read from ``optimizer.pt``'s parameter groups: ``torch.optim.SGD``
(``optim="sgd"``) gives "sgd" or "momentum" with its weight decay. The Trainer puts biases and
normalisation weights in a group without weight decay; the trajectory then carries the
parameter-weighted mean decay (exact when all groups agree; otherwise an approximation of the
per-parameter decay, with a warning). ``torch.optim.Adam`` / ``AdamW`` runs
(``optim="adamw_torch"``, the Trainer's default) give "adam" / "adamw" with their betas and
eps, every checkpoint's ``optimizer.pt`` as its optimizer state, and the Trainer's two param
groups (``trainer_param_order``) as the trajectory's ``param_order``, so SOURCE uses Adam's
preconditioner (``trajectory.optimizer_state``); ``model=`` is then required.
"""

from __future__ import annotations

import io
import json
import math
import operator
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from source_proj.trajectory.checkpoints import Checkpoint, Trajectory, TrajectoryError
from source_proj.trajectory.lr_history import scheduled_group_rates
from source_proj.trajectory.optimizer_state import (
    group_decays,
    mean_group_decay,
    state_sizes,
)

_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
RECORD_FILE = "source_record.json"
# Run settings of trainer_state.json that every checkpoint folder of one run shares.
_RUN_SETTINGS = ("max_steps", "train_batch_size", "logging_steps", "save_steps", "num_train_epochs")
# Rates computed the same way agree to rounding; a different schedule differs far beyond this.
_RATE_RTOL, _RATE_ATOL = 1e-9, 1e-15
T = TypeVar("T")


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
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TrajectoryError(f"cannot read {os.fspath(path)!r}: {exc}") from exc
    if not isinstance(state, dict):
        raise TrajectoryError(f"{os.fspath(path)!r} is not a Trainer state (a JSON object)")
    return state


def _torch_load(path: Path) -> dict:
    """A ``torch.save``d state dict of tensors and plain values, or a TrajectoryError naming the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, unsupported types: all one verdict
        raise TrajectoryError(f"cannot read {os.fspath(path)!r} (truncated or not written by the Trainer?): {exc}") from exc
    if not isinstance(state, dict):
        raise TrajectoryError(f"{os.fspath(path)!r} holds a {type(state).__name__}, not a state dict")
    return state


def _scheduler_state(folder: Path) -> dict | None:
    """``scheduler.pt`` of a checkpoint folder (None if absent): its ``last_epoch`` (scheduler
    steps taken), ``_last_lr`` (each group's rate of the next step) and ``base_lrs``."""
    path = folder / "scheduler.pt"
    if not path.is_file():
        return None
    state = _torch_load(path)
    if not state.get("_last_lr") or "last_epoch" not in state:
        raise TrajectoryError(f"{os.fspath(path)!r} is not an LR scheduler state (no _last_lr / last_epoch)")
    return state


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_RATE_RTOL, abs_tol=_RATE_ATOL)


# ------------------------------------------------------------------ training_args.bin
class _StandIn:
    """What a pickle builds for a class it names: the constructor arguments (``args``) and the
    pickled state as attributes. Nothing of the named class runs."""

    args: tuple[object, ...]

    def __new__(cls, *args: object, **kwargs: object) -> _StandIn:
        obj = object.__new__(cls)
        obj.args = args
        return obj

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (__dict__, __slots__ values)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)


class _StandInUnpickler(pickle.Unpickler):
    _SAFE = {("builtins", n) for n in ("set", "frozenset", "complex", "slice", "bytearray")} | {
        ("collections", "OrderedDict")
    }

    def find_class(self, module: str, name: str) -> type:
        if (module, name) in self._SAFE:
            return super().find_class(module, name)
        return type(name, (_StandIn,), {"origin": f"{module}.{name}"})

    def persistent_load(self, pid: object) -> object:
        raise pickle.UnpicklingError("it holds tensors, which training arguments do not")


def _plain(value: object) -> object:
    """An enum's stand-in as its value (``SchedulerType("linear")`` -> "linear")."""
    if isinstance(value, _StandIn) and len(value.args) == 1:
        return value.args[0]
    return value


@dataclass(frozen=True)
class ScheduleArgs:
    """The learning-rate schedule of a run's ``TrainingArguments`` (``training_args.bin``)."""

    scheduler: str
    learning_rate: float
    warmup_steps: float
    warmup_ratio: float
    scheduler_kwargs: dict

    def warmup(self, total_steps: int) -> int:
        """Warm-up steps as ``TrainingArguments.get_warmup_steps`` counts them: ``warmup_steps``
        (a fraction of the total when < 1, transformers 5) or else ``warmup_ratio`` of the total
        (transformers 4)."""
        if self.warmup_steps >= 1:
            return int(self.warmup_steps)
        return math.ceil(total_steps * (self.warmup_steps or self.warmup_ratio))

    def rates(self, base_rates: Sequence[float], total_steps: int, steps: int) -> np.ndarray:
        """(steps, groups) float64: each group's rate at optimizer steps 1..steps, replayed
        with ``transformers.get_scheduler`` as ``Trainer.create_scheduler`` builds it."""
        from transformers import get_scheduler

        def make(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
            return get_scheduler(self.scheduler, optimizer, num_warmup_steps=self.warmup(total_steps),
                                 num_training_steps=total_steps, scheduler_specific_kwargs=self.scheduler_kwargs)

        return np.array(scheduled_group_rates(make, base_rates, steps), dtype=np.float64).reshape(steps, len(base_rates))


def schedule_args(folder: str | os.PathLike) -> ScheduleArgs | None:
    """The schedule of ``training_args.bin`` in a checkpoint folder (None if there is none),
    read without running any pickled code."""
    path = Path(folder) / "training_args.bin"
    if not path.is_file():
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            args = _StandInUnpickler(io.BytesIO(archive.read(name))).load()
        fields = args.__dict__
        kwargs = fields.get("lr_scheduler_kwargs") or {}
        kwargs = json.loads(kwargs) if isinstance(kwargs, str) else dict(kwargs)
        return ScheduleArgs(
            scheduler=str(_plain(fields["lr_scheduler_type"])), learning_rate=float(fields["learning_rate"]),
            warmup_steps=float(fields.get("warmup_steps") or 0), warmup_ratio=float(fields.get("warmup_ratio") or 0),
            scheduler_kwargs=kwargs,
        )
    except Exception as exc:  # truncated zip, bad pickle, missing fields: all one verdict
        raise TrajectoryError(
            f"cannot read the learning-rate schedule from {os.fspath(path)!r} (truncated, or not a Trainer's "
            f"TrainingArguments?): {exc!r}. Delete it to fall back to the logged rates, or pass learning_rates="
        ) from exc


# ------------------------------------------------------------------ the callback's record
@dataclass(frozen=True)
class TrainerRecord:
    """What :class:`SourceRecordCallback` wrote beside a checkpoint (``source_record.json``).

    Attributes:
        global_step: the checkpoint's optimizer step.
        stage: the stage label of the run's checkpoints.
        learning_rates: each param group's rate of steps ``first_step..global_step``, as the
            optimizer held it just before ``optimizer.step()``.
        batch_digests: per step, the first 16 hex digits of a SHA-256 of the ``input_ids`` and
            ``labels`` tensors (shape and bytes) of the step's micro-batches in the order the
            model received them on this process (None where not seen): equal digests mean the
            same token batches in the same order.
        first_step: the first recorded step (> 1 when a run resumed from a checkpoint without
            a record).
        sequences, target_tokens: the training sequences (rows of ``labels``) the model
            received and their target tokens (labels other than -100 after the first of each
            row, as a causal LM's loss shifts them), on this process.
        equal_targets: whether every sequence had the same number of target tokens.
    """

    global_step: int
    stage: Hashable
    learning_rates: tuple[tuple[float, ...], ...]
    batch_digests: tuple[str | None, ...]
    first_step: int = 1
    sequences: int = 0
    target_tokens: int = 0
    equal_targets: bool = True

    def __post_init__(self) -> None:
        count = self.global_step - self.first_step + 1
        if len(self.learning_rates) != count or len(self.batch_digests) != count:
            raise TrajectoryError(
                f"a record of steps {self.first_step}..{self.global_step} needs {count} rates and digests, got "
                f"{len(self.learning_rates)} and {len(self.batch_digests)}"
            )

    def precedes(self, later: TrainerRecord) -> bool:
        """Whether this (an earlier checkpoint's) record agrees with ``later`` on every step both hold."""
        if self.stage != later.stage or self.global_step > later.global_step:
            return False
        start = max(self.first_step, later.first_step)
        mine = slice(start - self.first_step, self.global_step - self.first_step + 1)
        theirs = slice(start - later.first_step, self.global_step - later.first_step + 1)
        return (self.learning_rates[mine] == later.learning_rates[theirs]
                and self.batch_digests[mine] == later.batch_digests[theirs])

    @property
    def complete(self) -> bool:
        """Whether it covers every step from the first."""
        return self.first_step == 1

    @property
    def reduction(self) -> str | float | None:
        """The per-sequence reduction of the Trainer's batch token mean (see
        :func:`trainer_loss_reduction`); None if no labels were seen."""
        if not self.sequences:
            return None
        return "mean" if self.equal_targets else self.target_tokens / self.sequences


def write_trainer_record(folder: str | os.PathLike, record: TrainerRecord) -> Path:
    """Write ``record`` to ``folder/source_record.json`` atomically (a temporary file renamed
    over it), so a reader never sees half of it."""
    path = Path(folder) / RECORD_FILE
    stage = list(record.stage) if isinstance(record.stage, tuple) else record.stage
    payload = {"format": 1, "global_step": record.global_step, "first_step": record.first_step, "stage": stage,
               "learning_rates": [list(r) for r in record.learning_rates], "batch_digests": list(record.batch_digests),
               "sequences": record.sequences, "target_tokens": record.target_tokens,
               "equal_targets": record.equal_targets}
    temporary = path.with_name(f".{RECORD_FILE}.{os.getpid()}.tmp")
    with open(temporary, "w") as f:
        json.dump(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    return path


def read_trainer_record(folder: str | os.PathLike) -> TrainerRecord | None:
    """The :class:`TrainerRecord` of a checkpoint folder, or None if it has none."""
    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        stage = data["stage"]
        return TrainerRecord(
            global_step=int(data["global_step"]), stage=tuple(stage) if isinstance(stage, list) else stage,
            learning_rates=tuple(tuple(float(r) for r in rates) for rates in data["learning_rates"]),
            batch_digests=tuple(data["batch_digests"]), first_step=int(data.get("first_step", 1)),
            sequences=int(data.get("sequences", 0)), target_tokens=int(data.get("target_tokens", 0)),
            equal_targets=bool(data.get("equal_targets", True)),
        )
    except (OSError, ValueError, KeyError, TypeError, TrajectoryError) as exc:
        raise TrajectoryError(f"cannot read {os.fspath(path)!r}: {exc}") from exc


# ------------------------------------------------------------------ one run, every folder
def _folder_record(folder: Path) -> TrainerRecord | None:
    """The folder's record, refused if it records another step than the folder's name."""
    record = read_trainer_record(folder)
    match = _CHECKPOINT_DIR.match(folder.name)
    assert match is not None, "checkpoint_folders lists checkpoint-<step> folders only"
    step = int(match.group(1))
    if record is not None and record.global_step != step:
        raise TrajectoryError(f"{os.fspath(folder / RECORD_FILE)!r} records step {record.global_step}, not the "
                              f"folder's {step}: copied from another checkpoint? Remove it")
    return record


def _check_folders(folders: list[tuple[int, Path]], states: dict[int, dict]) -> None:
    """Refuse, by name, a folder whose trainer_state.json disagrees with its name or with the
    last folder's run (see the module docstring)."""
    for step, folder in folders:
        if states[step].get("global_step") != step:
            raise TrajectoryError(
                f"{os.fspath(folder)!r}: trainer_state.json says global_step {states[step].get('global_step')}, but "
                f"the folder is named checkpoint-{step} (renamed, or from another run): remove or rename it"
            )
    last_step, last = folders[-1]
    history = states[last_step].get("log_history", [])
    for step, folder in folders[:-1]:
        state = states[step]
        own = state.get("log_history", [])
        settings = [k for k in _RUN_SETTINGS if state.get(k) != states[last_step].get(k)]
        if settings or json.dumps(own) != json.dumps(history[: len(own)]):
            what = f"{', '.join(settings)} disagree" if settings else "log_history disagrees"
            raise TrajectoryError(
                f"{os.fspath(folder)!r}: its trainer_state.json's {what} with {os.fspath(last)!r}'s: a folder from "
                "another run? Remove it"
            )


def _last_of_run(folders: list[tuple[int, Path]], read: Callable[[Path], T | None],
                 agrees: Callable[[T, T], bool], what: str) -> T | None:
    """The last folder's ``read(folder)`` (None if absent), after checking that every other
    folder's agrees with it; a folder that disagrees is refused by name."""
    values = [(folder, read(folder)) for _, folder in folders]
    last_folder, last = values[-1]
    for folder, own in values[:-1]:
        if own is not None and last is not None and not agrees(own, last):
            raise TrajectoryError(
                f"{os.fspath(folder)!r}: its {what} disagrees with {os.fspath(last_folder)!r}'s: a folder from another "
                "run? Remove it"
            )
    return last


def _logged_rates(log_history: Sequence[dict]) -> dict[int, float]:
    return {int(e["step"]): float(e["learning_rate"]) for e in log_history if "learning_rate" in e and "step" in e}


def _check_rates(rates: np.ndarray, logged: dict[int, float], next_rates: dict[int, tuple[Path, list[float]]],
                 source: str, log_file: Path) -> None:
    """Refuse ``rates`` ((n, groups), steps 1..n) where a checkpoint's ``scheduler.pt``
    (``next_rates``: step -> (file, each group's rate of the next step)) or a logged rate
    (group 0's, of the logged step or the one after it: the shift that fits best) disagrees."""
    for step, (path, saved) in sorted(next_rates.items()):
        if step >= len(rates):
            continue
        if len(saved) != rates.shape[1]:
            raise TrajectoryError(f"{os.fspath(path)!r} has {len(saved)} param groups, {source} {rates.shape[1]}")
        for group, (got, expected) in enumerate(zip(saved, rates[step])):
            if not _close(got, expected):
                raise TrajectoryError(
                    f"{os.fspath(path)!r}: the learning rate of step {step + 1} (param group {group}) is {got!r}, but "
                    f"{source} gives {expected!r}"
                )
    misfits = {
        shift: [(s, r, float(rates[s - 1 + shift, 0])) for s, r in sorted(logged.items())
                if 0 <= s - 1 + shift < len(rates) and not _close(r, rates[s - 1 + shift, 0])]
        for shift in (0, 1)
    }
    shift = min(misfits, key=lambda k: len(misfits[k]))
    if misfits[shift]:
        step, got, expected = misfits[shift][0]
        raise TrajectoryError(
            f"{os.fspath(log_file)!r} logs learning rate {got!r} at step {step}, but {source} gives {expected!r} for "
            f"step {step + shift} ({len(misfits[shift])} of {len(logged)} logged rates disagree)"
        )


def _replayed_rates(args: ScheduleArgs, state: dict, schedulers: dict[int, tuple[Path, dict]], last_step: int,
                    args_file: Path) -> np.ndarray:
    """(last_step + 1, groups): the schedule of ``args`` replayed (see the module docstring),
    after checking that every scheduler.pt was stepped once per optimizer step."""
    for step, (path, saved) in sorted(schedulers.items()):
        if int(saved["last_epoch"]) != step:
            raise TrajectoryError(
                f"{os.fspath(path)!r}: the scheduler was stepped {saved['last_epoch']} times in {step} optimizer steps "
                "(steps skipped, e.g. on fp16 overflow), so the schedule cannot be replayed: record the rates with "
                "SourceRecordCallback, or pass learning_rates="
            )
    base = [args.learning_rate]
    if last_step in schedulers:
        path, saved = schedulers[last_step]
        base = [float(r) for r in saved.get("base_lrs", base)]
        if len(set(base)) == 1 and not _close(base[0], args.learning_rate):
            raise TrajectoryError(
                f"{os.fspath(args_file)!r} says learning_rate {args.learning_rate!r}, but {os.fspath(path)!r} was "
                f"built on {base[0]!r}: the arguments are not this run's"
            )
    total = int(state.get("max_steps") or last_step)
    return args.rates(base, total, last_step + 1)


def step_learning_rates(log_history: Sequence[dict], next_rates: dict[int, float], total_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-step learning rates (total_steps,) float64 from the logs and schedulers alone, and
    (total_steps,) bool: which of them are known exactly (the others are interpolated
    linearly between known steps, and held at the first / last known rate outside them).

    Args:
        log_history: ``trainer_state.json``'s entries (those with ``learning_rate``).
        next_rates: global step s -> the rate of step s + 1 (from ``scheduler.pt``).
        total_steps: the last step.
    """
    logged = _logged_rates(log_history)
    # Rates logged at step s are the rate used at s (shift 0) or at s + 1 (shift 1):
    # scheduler.pt, which gives the rate of s + 1, tells which.
    votes = {0: 0, 1: 0}
    for s, rate in next_rates.items():
        for shift, step in ((0, s + 1), (1, s)):
            if step in logged and _close(logged[step], rate):
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
    return rates, np.isin(steps, points)


def _fallback_rates(output_dir: str | os.PathLike, log_history: Sequence[dict],
                    next_rates: dict[int, tuple[Path, list[float]]], last_step: int) -> np.ndarray:
    """(last_step, 1): the rates of :func:`step_learning_rates`, with a warning saying which are exact."""
    rates, exact = step_learning_rates(log_history, {s: r[0] for s, (_, r) in next_rates.items()}, last_step)
    if not exact.all():
        first = int(np.argmax(exact)) + 1 if exact.any() else last_step + 1
        held = f", and steps 1..{first - 1} before the first known one take its rate (a warm-up there is lost)"
        warnings.warn(
            f"{os.fspath(output_dir)}: no source_record.json or training_args.bin to replay the schedule from, so the "
            f"learning rates come from the logs and scheduler.pt: {int(exact.sum())} of {last_step} steps are exact; "
            f"the others are interpolated linearly between known steps{held if first > 1 else ''}. Record them with "
            "SourceRecordCallback, or pass learning_rates=",
            stacklevel=3,
        )
    return rates[:, None]


def trainer_param_order(model: torch.nn.Module) -> list[list[str]]:
    """The parameter names of each optimizer group as ``Trainer.create_optimizer`` forms them:
    [names with weight decay, names without], in ``named_parameters()`` order (needs
    ``transformers``). The integer ids of ``optimizer.pt`` index this order."""
    from transformers import Trainer

    # called unbound: the method does not use self
    decay = set(Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return [[n for n in names if n in decay], [n for n in names if n not in decay]]


def optimizer_settings(folder: Path, model: torch.nn.Module | None = None) -> OptimizerSettings:
    """The optimizer of a checkpoint folder's ``optimizer.pt`` (see the module docstring).
    ``model`` gives the groups' sizes when the optimizer keeps no per-parameter state (plain
    SGD) and the groups' weight decays differ."""
    path = folder / "optimizer.pt"
    if not path.is_file():
        raise TrajectoryError(f"{os.fspath(folder)!r} has no optimizer.pt to read the optimizer from")
    state = _torch_load(path)
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


def trainer_loss_reduction(output_dir: str | os.PathLike) -> str | float:
    """The :class:`~source_proj.gradients.causal_lm.CausalLMTask` reduction of the loss a
    Trainer run minimised.

    The Trainer minimises the model's own loss, which for a Hugging Face causal LM
    (``config.json``'s architecture ``*ForCausalLM`` / ``*LMHeadModel``) is the token
    cross-entropy summed over the batch's target tokens (across gradient-accumulation
    micro-batches) divided by their number: per sequence, the sum over its tokens divided by
    the batch's mean target count. Where every sequence has the same count that is ``"mean"``;
    otherwise, the mean target count of the run's sequences (a number, exact up to the
    batches' variation around it). The counts come from the :class:`SourceRecordCallback`
    record; without one, ``"mean"`` is assumed with a warning. Refuses a model that is not
    such a causal LM.
    """
    _, last = checkpoint_folders(output_dir)[-1]
    path = last / "config.json"
    try:
        architectures = json.loads(path.read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError) as exc:
        raise TrajectoryError(f"cannot read the model's config {os.fspath(path)!r}: {exc}") from exc
    if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise TrajectoryError(
            f"{os.fspath(path)!r}: the model ({architectures}) is not a Hugging Face causal LM, whose loss the Trainer "
            "is known to average over tokens: pass CausalLMTask(reduction=...) as it was trained"
        )
    record = read_trainer_record(last)
    if record is not None and record.complete and record.reduction is not None:
        return record.reduction
    warnings.warn(
        f"{os.fspath(last)}: no {RECORD_FILE} with the run's token counts (train with SourceRecordCallback): "
        "reduction 'mean' assumed, exact when every sequence has the same number of target tokens",
        stacklevel=2,
    )
    return "mean"


def trainer_trajectory(
    output_dir: str | os.PathLike,
    *,
    stage: Hashable | None = None,
    learning_rates: Sequence[float] | None = None,
    model: torch.nn.Module | None = None,
) -> Trajectory:
    """The trajectory of the Trainer run in ``output_dir`` (see the module docstring).

    Args:
        output_dir: the Trainer's ``output_dir`` holding ``checkpoint-<step>/`` folders.
        stage: the stage label of all its checkpoints (default: the
            :class:`SourceRecordCallback` record's, else 0).
        learning_rates: the per-step rates of the whole run (length = the last global step),
            instead of those of the record, the replayed schedule or the logs.
        model: the trained architecture; needed for Adam/AdamW runs (to name the optimizer
            states' parameters) and to size parameter groups whose weight decays differ when
            the optimizer kept no per-parameter state.
    """
    folders = checkpoint_folders(output_dir)
    states = {step: _trainer_state(folder) for step, folder in folders}
    _check_folders(folders, states)
    last_step, last = folders[-1]
    log_history = states[last_step].get("log_history", [])
    args = _last_of_run(folders, schedule_args, operator.eq, "training_args.bin schedule")
    record = _last_of_run(folders, _folder_record, TrainerRecord.precedes, RECORD_FILE)
    if record is not None and not record.complete:
        warnings.warn(f"{os.fspath(last / RECORD_FILE)}: the record starts at step {record.first_step} (a resumed "
                      "run), so it is not used", stacklevel=2)
        record = None
    schedulers = {s: (f / "scheduler.pt", st) for s, f in folders if (st := _scheduler_state(f)) is not None}
    next_rates = {s: (path, [float(r) for r in st["_last_lr"]]) for s, (path, st) in schedulers.items()}
    if learning_rates is not None:
        rates = np.asarray(learning_rates, dtype=np.float64)
        if rates.shape != (last_step,):
            raise TrajectoryError(f"learning_rates must have one rate per step ({last_step}), got shape {rates.shape}")
        rates = rates[:, None]
    elif record is not None or args is not None:
        if record is not None:
            rates, source = np.array(record.learning_rates, dtype=np.float64), f"{os.fspath(last / RECORD_FILE)!r}"
        else:
            assert args is not None  # no record: the schedule's arguments
            rates = _replayed_rates(args, states[last_step], schedulers, last_step, last / "training_args.bin")
            source = f"the {args.scheduler} schedule of {os.fspath(last / 'training_args.bin')!r}"
        _check_rates(rates, _logged_rates(log_history), next_rates, source, last / "trainer_state.json")
    else:
        rates = _fallback_rates(output_dir, log_history, next_rates, last_step)
        _check_rates(rates, _logged_rates(log_history), {s: (p, r[:1]) for s, (p, r) in next_rates.items()},
                     "the interpolation of the logged and scheduler.pt rates",
                     last / "trainer_state.json")
    rates = rates[:last_step]
    differ = np.flatnonzero(~np.isclose(rates, rates[:, :1], rtol=_RATE_RTOL, atol=_RATE_ATOL).all(axis=1))
    if len(differ):
        warnings.warn(
            f"{os.fspath(output_dir)}: the param groups' learning rates differ (step {differ[0] + 1}: "
            f"{rates[differ[0]].tolist()}); the trajectory uses group 0's",
            stacklevel=2,
        )
    if stage is None:
        stage = record.stage if record is not None else 0
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
        history = [float(r) for r in rates[previous:step, 0]]
        state = str(folder / "optimizer.pt") if adam else None
        if adam and not (folder / "optimizer.pt").is_file():
            raise TrajectoryError(f"{os.fspath(folder)!r} has no optimizer.pt: an {settings.kind} run needs every "
                                  "checkpoint's optimizer state (Trainer(save_only_model=False))")
        checkpoints.append(Checkpoint(str(folder), steps=step - previous, lr=history, stage=stage, optimizer_state=state))
        previous = step
    if adam:
        assert model is not None, "refused above"
        assert settings.betas is not None and settings.eps is not None, "Adam's settings have both"
        return Trajectory(
            tuple(checkpoints), optimizer=settings.kind, weight_decay=settings.weight_decay, betas=settings.betas,
            eps=settings.eps, param_order=tuple(tuple(g) for g in trainer_param_order(model)),
        )
    return Trajectory(
        tuple(checkpoints), optimizer=settings.kind, momentum=settings.momentum, weight_decay=settings.weight_decay
    )

