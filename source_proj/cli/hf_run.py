"""A Hugging Face ``Trainer`` output directory as a command-line task (``--run DIR``), with no
Python to write::

    source-proj fit  --run out/ --train train.jsonl --store feats.zarr
    source-proj topk --run out/ --train train.jsonl --queries questions.csv --store feats.zarr -k 5

From the run's last ``checkpoint-<step>/`` folder: the model's configuration (``config.json``;
the architecture is built by the Auto class of the task with ``from_config``, and its weights
at every checkpoint come from the trajectory), the tokenizer where one was saved (in the last
checkpoint or the output directory itself), and the trajectory with
:func:`~source_proj.trajectory.hf_trainer.trainer_trajectory` (learning rates, optimizer,
Adam/AdamW states of every checkpoint).

The task follows from the architecture's name (``config.json``'s ``architectures``), or
``task_type``:

* ``*ForCausalLM`` / ``*LMHeadModel``: causal LM, next-token loss with the reduction the
  Trainer minimised (:func:`~source_proj.trajectory.hf_trainer.trainer_loss_reduction`);
* ``*ForSequenceClassification``: classification (cross-entropy; regression where the
  config's ``problem_type`` is ``"regression"`` or it has one label);
* ``*ForTokenClassification``: per-token cross-entropy without shift, averaged over a row's
  labelled tokens as the Trainer averages over a batch's (the mean count of the training
  rows where counts differ).

Data files are read by :mod:`source_proj.cli.data_files`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from source_proj.cli.data_files import TASK_TYPES, Rows, tokenised_rows
from source_proj.cli.task_spec import TaskSpec, TaskSpecError

_SUFFIXES = {
    "causal_lm": ("ForCausalLM", "LMHeadModel"),
    "sequence_classification": ("ForSequenceClassification",),
    "token_classification": ("ForTokenClassification",),
}
_AUTO_CLASSES = {
    "causal_lm": "AutoModelForCausalLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "token_classification": "AutoModelForTokenClassification",
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt")


@dataclass(frozen=True)
class HFRun:
    """What a Trainer output directory holds, beside its trajectory.

    Attributes:
        path: the output directory.
        last: its last ``checkpoint-<step>/`` folder.
        task_type: one of ``data_files.TASK_TYPES``.
        model: the architecture (weights from the trajectory).
        tokenizer: the saved tokenizer, or None.
    """

    path: Path
    last: Path
    task_type: str
    model: Any
    tokenizer: Any | None


def _architecture(config_path: Path) -> str | None:
    try:
        architectures = json.loads(config_path.read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError) as exc:
        raise TaskSpecError(f"cannot read the model's configuration {config_path}: {exc}") from exc
    return architectures[0] if architectures else None


def _task_type(architecture: str | None, override: str | None, config_path: Path) -> str:
    if override is not None:
        if override not in TASK_TYPES:
            raise TaskSpecError(f"--task-type must be one of {list(TASK_TYPES)}, got {override!r}")
        return override
    found = [kind for kind, suffixes in _SUFFIXES.items() if architecture and architecture.endswith(suffixes)]
    if not found:
        raise TaskSpecError(f"cannot tell the task of architecture {architecture!r} ({config_path}): pass "
                            f"--task-type, one of {list(TASK_TYPES)}")
    return found[0]


def _tokenizer(folders: list[Path]) -> Any | None:
    from transformers import AutoTokenizer

    for folder in folders:
        if any((folder / name).is_file() for name in _TOKENIZER_FILES):
            try:
                return AutoTokenizer.from_pretrained(str(folder))
            except (OSError, ValueError) as exc:
                raise TaskSpecError(f"cannot load the tokenizer saved in {folder}: {exc}") from exc
    return None


def open_run(run_dir: str | os.PathLike, task_type: str | None = None) -> HFRun:
    """The model, task type and tokenizer of the Trainer run in ``run_dir`` (see the module
    docstring); ``task_type`` overrides the one read from the architecture."""
    import transformers

    from source_proj.trajectory.hf_trainer import checkpoint_folders

    path = Path(run_dir)
    _, last = checkpoint_folders(path)[-1]
    config_path = last / "config.json"
    architecture = _architecture(config_path)
    kind = _task_type(architecture, task_type, config_path)
    config = transformers.AutoConfig.from_pretrained(str(last))
    try:
        # Eager attention: the same function as SDPA, and it runs under torch.func.vmap (per-example
        # gradients in one batch; SDPA falls back to one example at a time).
        model = getattr(transformers, _AUTO_CLASSES[kind]).from_config(config, attn_implementation="eager")
    except ValueError as exc:
        raise TaskSpecError(f"{config_path}: transformers has no {kind} model for {config.model_type!r}: {exc}") from exc
    if architecture is not None and type(model).__name__ != architecture:
        raise TaskSpecError(f"{config_path} names architecture {architecture!r}, but the {kind} model of "
                            f"{config.model_type!r} is {type(model).__name__}: check --task-type")
    return HFRun(path, last, kind, model, _tokenizer([last, path]))


def _classifier_task(config: Any) -> str:
    problem = getattr(config, "problem_type", None)
    if problem == "multi_label_classification":
        raise TaskSpecError("multi-label classification runs (problem_type 'multi_label_classification') are not "
                            "supported: write a --task file with a Task for their loss")
    return "regression" if problem == "regression" or config.num_labels == 1 else "classification"


def _task(run: HFRun, train: Rows) -> Any:
    from source_proj.gradients.causal_lm import CausalLMTask
    from source_proj.trajectory.hf_trainer import trainer_loss_reduction

    if run.task_type == "causal_lm":
        return CausalLMTask(reduction=trainer_loss_reduction(run.path))
    if run.task_type == "sequence_classification":
        return _classifier_task(run.model.config)
    counts = [sum(label != -100 for label in row) for row in train.columns["labels"]]
    reduction = "mean" if len(set(counts)) == 1 else sum(counts) / len(counts)
    return CausalLMTask(reduction=reduction, shift=False, measure="log_prob")


def run_task_and_reader(
    run_dir: str | os.PathLike,
    train: str | os.PathLike,
    queries: str | os.PathLike | None = None,
    *,
    task_type: str | None = None,
    text_column: str = "text",
    label_column: str | None = None,
    max_length: int | None = None,
) -> tuple[TaskSpec, Callable[[str], Any]]:
    """The :class:`TaskSpec` of the Trainer run ``run_dir`` with training rows from the data
    file or folder ``train`` and query rows from ``queries`` (see the module docstring and
    :mod:`source_proj.cli.data_files`; texts are the rows' tokens decoded), and a function that
    reads one more query data file (a path) as ``queries`` is read, with the run's tokenizer,
    task type and labels (``topk --query-files``: the run is opened once for all of them)."""
    from source_proj.trajectory.hf_trainer import trainer_trajectory

    run = open_run(run_dir, task_type)
    config = run.model.config
    read: dict[str, Any] = dict(tokenizer=run.tokenizer, task_type=run.task_type, text_column=text_column,
                label_column=label_column, max_length=max_length, label2id=getattr(config, "label2id", None) or {},
                num_labels=getattr(config, "num_labels", 0))
    train_rows = tokenised_rows(os.fspath(train), **read)
    query_rows = None if queries is None else tokenised_rows(os.fspath(queries), **read)
    spec = TaskSpec(
        model=run.model,
        task=_task(run, train_rows),
        trajectory=trainer_trajectory(run.path, model=run.model),
        train=train_rows.dataset(),
        queries=None if query_rows is None else query_rows.dataset(),
        train_text="text",
        query_text=None if query_rows is None else "text",
    )
    return spec, lambda path: tokenised_rows(path, **read).dataset()
