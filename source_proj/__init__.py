"""source-proj: training data attribution with SOURCE in a random-projection space.

The public API is what this module exports: :class:`SourceAttributor` (fit, score, top-k,
self-influence) with its settings :class:`SourceConfig`; the description of a training run
(:class:`Trajectory`, :class:`Checkpoint`, :func:`trainer_trajectory` for a Hugging Face
Trainer folder, :class:`SourceRecordCallback` to record what a checkpoint folder lacks); the
tasks (what a row's loss and a query's measurement are); feature stores (:func:`fit_store`,
:func:`open_store`) and their top-k search; and the exceptions, all derived from
:class:`SourceProjError`. Evaluation (``source_proj.evaluation``) and curation
(``source_proj.curation``) are subpackages with their own APIs.

Names are imported on first use, so ``import source_proj`` is cheap and never imports the
command line, transformers or faiss.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS = {
    "SourceAttributor": "source_proj.attributor",
    "SourceConfig": "source_proj.config",
    "Trajectory": "source_proj.trajectory.checkpoints",
    "Checkpoint": "source_proj.trajectory.checkpoints",
    "LearningRateRecorder": "source_proj.trajectory.lr_history",
    "scheduled_rates": "source_proj.trajectory.lr_history",
    "trainer_trajectory": "source_proj.trajectory.hf_trainer",
    "trainer_loss_reduction": "source_proj.trajectory.hf_trainer",
    "SourceRecordCallback": "source_proj.trajectory.trainer_callback",
    "Task": "source_proj.gradients.tasks",
    "ClassificationTask": "source_proj.gradients.tasks",
    "RegressionTask": "source_proj.gradients.tasks",
    "CausalLMTask": "source_proj.gradients.causal_lm",
    "mask_prompt": "source_proj.gradients.causal_lm",
    "fit_store": "source_proj.store_fit",
    "open_store": "source_proj.store_fit",
    "FeatureStore": "source_proj.features.store",
    "exact_topk": "source_proj.retrieval.exact",
    "exact_proponents_opponents": "source_proj.retrieval.exact",
    "SourceProjError": "source_proj.errors",
    "InputError": "source_proj.errors",
    "TrajectoryError": "source_proj.trajectory.checkpoints",
    "NonFiniteError": "source_proj.gradients.per_example",
    "MemoryBudgetError": "source_proj.gradients.memory",
    "StoreError": "source_proj.features.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'source_proj' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:
    from source_proj.attributor import SourceAttributor
    from source_proj.config import SourceConfig
    from source_proj.errors import InputError, SourceProjError
    from source_proj.features.errors import StoreError
    from source_proj.features.store import FeatureStore
    from source_proj.gradients.causal_lm import CausalLMTask, mask_prompt
    from source_proj.gradients.memory import MemoryBudgetError
    from source_proj.gradients.per_example import NonFiniteError
    from source_proj.gradients.tasks import ClassificationTask, RegressionTask, Task
    from source_proj.retrieval.exact import exact_proponents_opponents, exact_topk
    from source_proj.store_fit import fit_store, open_store
    from source_proj.trajectory.checkpoints import Checkpoint, Trajectory, TrajectoryError
    from source_proj.trajectory.hf_trainer import trainer_loss_reduction, trainer_trajectory
    from source_proj.trajectory.lr_history import LearningRateRecorder, scheduled_rates
    from source_proj.trajectory.trainer_callback import SourceRecordCallback
