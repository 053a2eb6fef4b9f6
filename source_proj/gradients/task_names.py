"""The tasks a string names: "classification", "regression", "causal_lm".

A module of its own because it imports every built-in task (``tasks`` and ``causal_lm``, which
itself builds on ``tasks``).
"""

from __future__ import annotations

from collections.abc import Callable

from source_proj.errors import InputError
from source_proj.gradients.causal_lm import CausalLMTask
from source_proj.gradients.tasks import ClassificationTask, RegressionTask, Task

# each built with its defaults
BUILTIN_TASKS: dict[str, Callable[[], Task]] = {
    "classification": ClassificationTask,
    "regression": RegressionTask,
    "causal_lm": CausalLMTask,
}


def resolve_task(task: Task | str) -> Task:
    """A Task from an instance or one of the names of ``BUILTIN_TASKS`` (built with their
    defaults; ``"causal_lm"`` assumes the Trainer's mean reduction and says so)."""
    if isinstance(task, Task):
        return task
    if task in BUILTIN_TASKS:
        return BUILTIN_TASKS[task]()
    raise InputError(f"unknown task {task!r}; pass a Task or one of {sorted(BUILTIN_TASKS)}")
