"""A ``transformers.TrainerCallback`` that records, during training, what SOURCE needs of a
Trainer run and its checkpoint folders lack::

    trainer = Trainer(..., callbacks=[SourceRecordCallback(stage="pretrain")])
    trainer.train()
    trajectory = trainer_trajectory(trainer.args.output_dir, model=model)   # uses the record

At every optimizer step it records each param group's learning rate as the optimizer holds it
just before ``optimizer.step()`` (so whatever the scheduler, custom ones and skipped steps
included) and a digest of the step's batches; it counts the training sequences and their
target tokens (for :func:`~source_proj.trajectory.hf_trainer.trainer_loss_reduction`). At
every save it writes the whole record so far, with the stage label, as ``source_record.json``
into the new ``checkpoint-<step>/`` folder (atomically; see
:class:`~source_proj.trajectory.hf_trainer.TrainerRecord`), which
:func:`~source_proj.trajectory.hf_trainer.trainer_trajectory` prefers to any replay.

The data-order digest: the Trainer hands the model batches, not sample indices, so the
callback hashes what the model receives: the ``input_ids`` and ``labels`` tensors of every
training forward (a forward pre-hook; evaluation forwards are skipped) of a step's
micro-batches, on this process. It costs one device-to-host copy of the token ids per
micro-batch; ``digest_batches=False`` turns it off (the token counts, one small copy per
micro-batch, stay). Only the main process writes (the rates
are every process's; the digests are its shard's). A run resumed from a checkpoint continues
that checkpoint's record.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from source_proj.errors import InputError
from source_proj.trajectory.hf_trainer import TrainerRecord, read_trainer_record, write_trainer_record

# The label of positions without a loss (torch's and transformers' ignore index). Defined here,
# not imported from ``gradients.data``: the trajectory layer sits below the gradient layer.
IGNORE_INDEX = -100
_JSON_SCALARS = (str, int, float, bool, type(None))


def _checkpoint_folder(args: TrainingArguments, step: int) -> Path:
    """The Trainer's ``checkpoint-<step>`` folder."""
    assert args.output_dir is not None, "TrainingArguments sets a default output_dir"
    return Path(args.output_dir) / f"checkpoint-{step}"


@dataclass
class _TokenCounts:
    """Training sequences seen, their target tokens, and whether all had the same count."""

    sequences: int = 0
    target_tokens: int = 0
    equal_targets: bool = True
    _first: int | None = None

    @classmethod
    def of(cls, record: TrainerRecord) -> _TokenCounts:
        """The counts a resumed run continues from."""
        common = record.target_tokens // record.sequences if record.sequences and record.equal_targets else None
        return cls(record.sequences, record.target_tokens, record.equal_targets, common)

    def add(self, per_sequence: torch.Tensor) -> None:
        counts = per_sequence.cpu().tolist()
        if self._first is None and counts:
            self._first = counts[0]
        self.equal_targets = self.equal_targets and all(c == self._first for c in counts)
        self.sequences += len(counts)
        self.target_tokens += sum(counts)


class SourceRecordCallback(TrainerCallback):
    """Records every step's per-group learning rates, batch digests and the stage label, and
    writes them beside each checkpoint (see the module docstring).

    Args:
        stage: the stage label of this run's checkpoints (a JSON scalar or a tuple of them).
        digest_batches: hash each step's token batches (see the module docstring).
    """

    def __init__(self, stage: Hashable = 0, digest_batches: bool = True) -> None:
        parts = stage if isinstance(stage, tuple) else (stage,)
        if not all(isinstance(p, _JSON_SCALARS) for p in parts):
            raise InputError(f"stage must be a str, number, bool, None or a tuple of them (stored as JSON), got {stage!r}")
        self.stage = stage
        self.digest_batches = digest_batches
        self._rates: list[tuple[float, ...]] = []
        self._digests: list[str | None] = []
        self._first_step: int | None = None
        self._batch = hashlib.sha256()
        self._seen = False
        self._counts = _TokenCounts()
        self._hook: torch.utils.hooks.RemovableHandle | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: torch.nn.Module | None = None, **kwargs: object) -> None:
        self._rates, self._digests, self._first_step, self._counts = [], [], None, _TokenCounts()
        if model is not None:
            self._hook = model.register_forward_pre_hook(self._see_batch, with_kwargs=True)

    def _see_batch(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        labels = kwargs.get("labels")
        if isinstance(labels, torch.Tensor) and labels.ndim == 2:
            self._counts.add((labels[:, 1:] != IGNORE_INDEX).sum(dim=1))
        if not self.digest_batches:
            return
        for name, value in (("input_ids", kwargs.get("input_ids", args[0] if args else None)), ("labels", labels)):
            if isinstance(value, torch.Tensor):
                self._batch.update(f"{name}{tuple(value.shape)}{value.dtype}".encode())
                self._batch.update(value.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
                self._seen = True

    def _start(self, args: TrainingArguments, done: int) -> None:
        """Begin at step ``done + 1``: after a resume, continue the resumed checkpoint's record."""
        self._first_step = done + 1
        if done:
            record = read_trainer_record(_checkpoint_folder(args, done))
            if record is not None and record.complete and record.global_step == done:
                self._rates, self._digests = list(record.learning_rates), list(record.batch_digests)
                self._first_step = 1
                self._counts = _TokenCounts.of(record)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: object) -> None:
        # The first step's, before its forwards: the resumed global_step is known by then.
        if self._first_step is None:
            self._start(args, state.global_step)

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              optimizer: torch.optim.Optimizer | None = None, **kwargs: object) -> None:
        assert optimizer is not None, "the Trainer passes its optimizer"
        self._rates.append(tuple(float(g["lr"]) for g in optimizer.param_groups))
        self._digests.append(self._batch.hexdigest()[:16] if self._seen else None)
        self._batch, self._seen = hashlib.sha256(), False

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: object) -> None:
        folder = _checkpoint_folder(args, state.global_step)
        if not state.is_world_process_zero or self._first_step is None or not folder.is_dir():
            return
        counts = self._counts
        write_trainer_record(folder, TrainerRecord(
            state.global_step, self.stage, tuple(self._rates), tuple(self._digests), self._first_step,
            counts.sequences, counts.target_tokens, counts.equal_targets,
        ))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: object) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
