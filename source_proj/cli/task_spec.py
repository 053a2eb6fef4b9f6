"""The user's description of a run for the command line: ``--task FILE.py:FUNCTION`` or
``--task MODULE:FUNCTION``.

The function takes no arguments and returns a :class:`TaskSpec` (or a dict with the same
keys). For example, ``my_task.py``::

    from source_proj.cli.task_spec import TaskSpec

    def task():
        model = MyNet()                                # the architecture
        trajectory = Trajectory(checkpoints, optimizer="momentum", momentum=0.9)
        return TaskSpec(model=model, task="classification", trajectory=trajectory,
                        train=(x_train, y_train), queries=(x_test, y_test))

and ``source-proj fit --task my_task.py:task --store feats.zarr``.

A language model, e.g. a GPT-2 trained with ``transformers.Trainer`` into ``out/``, with its
rows in a ``datasets.Dataset`` (``input_ids``; the targets are the tokens themselves)::

    def lm_task():
        model = GPT2LMHeadModel(GPT2Config.from_pretrained("out/checkpoint-500"))
        rows = datasets.load_from_disk("tokenised_train")
        return TaskSpec(model=model, task=CausalLMTask(reduction=trainer_loss_reduction("out")),
                        trajectory=trainer_trajectory("out", model=model), train=rows,
                        queries=datasets.load_from_disk("tokenised_questions"),
                        train_text="text", query_text="text", config={"proj_dim": 4096})

For such a Trainer run the command line needs no Python at all: ``source-proj fit --run out/
--train train.jsonl --store feats.zarr`` (see :mod:`source_proj.cli.hf_run`). A task file is
for everything else: other training loops, custom tasks, several query sets.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from torch import nn

from source_proj.errors import InputError
from source_proj.gradients.tasks import Task
from source_proj.trajectory.checkpoints import Trajectory

TextColumn = str | Sequence[str] | None


class TaskSpecError(InputError):
    """A ``--task`` reference that cannot be loaded, or a function returning something unusable."""


@dataclass(frozen=True)
class TaskSpec:
    """What a ``--task`` function returns.

    Attributes:
        model: the trained architecture (``nn.Module``); its weights come from the trajectory.
        task: a ``Task``, or "classification" / "regression".
        trajectory: the run's checkpoints and optimizer settings (``Trajectory``).
        train: the training rows: ``(inputs, targets)`` tensors, a ``Dataset`` or a
            ``DataLoader`` (its dataset, in index order). Train id i is row i.
        queries: the rows to explain (same forms; query id i is row i), needed by
            ``score`` and ``topk``.
        query_sets: further named query sets (name -> rows in the same forms), e.g.
            ``{"validation": (x_val, y_val)}`` for ``curate --against validation``; the
            name "queries" always means ``queries``.
        config: ``SourceConfig`` settings for ``fit`` (e.g. ``{"proj_dim": 2048}``); flags
            given on the command line take precedence.
        fit_options: keyword arguments of ``SourceAttributor.prepare``: ``stages``,
            ``num_train``, ``curvature_data``.
        train_text, query_text: a per-row description written beside the ids in ``topk``
            and ``self-influence`` output (a label, the text of a sequence): one string per
            row, or the name of a column of the rows (of a ``datasets.Dataset``, a dict of
            columns or dict items).
        param_names, output: as for ``SourceAttributor`` (parameter patterns; which tensor of
            the model's output the task sees).
    """

    model: nn.Module
    task: Task | str
    trajectory: Trajectory
    train: Any
    queries: Any = None
    query_sets: Mapping[str, Any] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)
    fit_options: Mapping[str, Any] = field(default_factory=dict)
    train_text: TextColumn = None
    query_text: TextColumn = None
    param_names: Sequence[str] | None = None
    output: str | Callable[[Any], Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise TaskSpecError(f"TaskSpec.model must be a torch.nn.Module, got {type(self.model).__name__}")
        if not isinstance(self.trajectory, Trajectory):
            raise TaskSpecError(f"TaskSpec.trajectory must be a Trajectory, got {type(self.trajectory).__name__}")
        if not isinstance(self.task, (Task, str)):
            raise TaskSpecError(f"TaskSpec.task must be a Task or a name, got {type(self.task).__name__}")
        if not isinstance(self.query_sets, Mapping) or not all(isinstance(k, str) for k in self.query_sets):
            raise TaskSpecError("TaskSpec.query_sets must map names (str) to query rows")
        if "queries" in self.query_sets:
            raise TaskSpecError("TaskSpec.query_sets cannot use the name 'queries' (it means TaskSpec.queries)")
        allowed = {"stages", "num_train", "curvature_data"}
        if set(self.fit_options) - allowed:
            raise TaskSpecError(f"TaskSpec.fit_options accepts {sorted(allowed)}, got {sorted(self.fit_options)}")


    def attributor(self, config: Any) -> Any:
        """The ``SourceAttributor`` of this run with ``config`` (a ``SourceConfig``)."""
        from source_proj.attributor import SourceAttributor

        return SourceAttributor(self.model, self.task, self.trajectory, config, param_names=self.param_names,
                                output=self.output)

    def texts(self, which: str) -> list[str] | None:
        """The per-row descriptions of "train" or "queries" rows (None if not given)."""
        spec, data = (self.train_text, self.train) if which == "train" else (self.query_text, self.queries)
        if spec is None or data is None:
            return None
        if isinstance(spec, str):
            try:
                values = data[spec] if hasattr(data, "column_names") or isinstance(data, Mapping) else [
                    data[i][spec] for i in range(len(data))
                ]
            except (KeyError, TypeError, IndexError) as exc:
                raise TaskSpecError(f"the {which} rows have no column {spec!r} for the text output: {exc}") from exc
        else:
            values = spec
        values = [str(v) for v in values]
        if len(values) != len(data):
            raise TaskSpecError(f"{len(values)} {which} texts for {len(data)} {which} rows")
        return values


def _load_function(reference: str) -> Any:
    target, sep, name = reference.rpartition(":")
    if not sep or not target or not name:
        raise TaskSpecError(f"--task must look like path/to/file.py:function or module:function, got {reference!r}")
    if target.endswith(".py") or os.sep in target or Path(target).is_file():
        path = Path(target)
        if not path.is_file():
            raise TaskSpecError(f"task file {path} does not exist")
        module_name = f"_source_proj_task_{path.stem}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:  # not a Python source file (it crashed with AttributeError)
            raise TaskSpecError(f"task file {path} cannot be imported: name a Python file (.py)")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise TaskSpecError(f"cannot import module {target!r} for --task: {exc}") from exc
    function = getattr(module, name, None)
    if not callable(function):
        raise TaskSpecError(f"{target} has no function {name!r}")
    return function


def load_task(reference: str) -> TaskSpec:
    """Call the function named by ``reference`` ("file.py:function" or "module:function")
    and return its ``TaskSpec`` (a dict with TaskSpec's keys is accepted too)."""
    result = _load_function(reference)()
    if isinstance(result, TaskSpec):
        return result
    if isinstance(result, Mapping):
        known = {f.name for f in fields(TaskSpec)}
        unknown = set(result) - known
        if unknown:
            raise TaskSpecError(f"{reference} returned unknown keys {sorted(unknown)}; TaskSpec has {sorted(known)}")
        try:
            return TaskSpec(**result)
        except TypeError as exc:
            raise TaskSpecError(f"{reference} returned an incomplete task: {exc}") from exc
    raise TaskSpecError(f"{reference} must return a TaskSpec or a dict, got {type(result).__name__}")


def query_set(spec: TaskSpec, name: str) -> Any:
    """The query rows called ``name``: "queries" for ``TaskSpec.queries``, else an entry of
    ``TaskSpec.query_sets``; raises ``TaskSpecError`` listing the names there are."""
    sets = {**({"queries": spec.queries} if spec.queries is not None else {}), **spec.query_sets}
    if name not in sets:
        raise TaskSpecError(f"the task has no query set {name!r}; it has {sorted(sets) or 'none'} (TaskSpec.queries, TaskSpec.query_sets)")
    return sets[name]
