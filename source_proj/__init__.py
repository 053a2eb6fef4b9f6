"""source-proj: training data attribution with SOURCE in a random-projection space.

The main entry point is :class:`SourceAttributor`; the feature store, retrieval and evaluation
live in their own modules (``source_proj.features.store``, ``source_proj.retrieval.exact``,
``source_proj.evaluation``) and are imported on demand.
"""

from source_proj.attributor import RowFeatures, SourceAttributor
from source_proj.cli.task_spec import TaskSpec
from source_proj.config import SourceConfig
from source_proj.gradients.per_example import NonFiniteError
from source_proj.gradients.tasks import ClassificationTask, RegressionTask, Task
from source_proj.projection.jl import ProjectionConfig, project
from source_proj.trajectory.checkpoints import (
    Checkpoint,
    Segment,
    Trajectory,
    TrajectoryError,
)
from source_proj.trajectory.lr_history import LearningRateRecorder, scheduled_rates
from source_proj.trajectory.training import (
    AdamWSettings,
    TrainSettings,
    train_adamw,
    train_sgd,
)

__version__ = "0.1.0"

__all__ = [
    "AdamWSettings",
    "Checkpoint",
    "ClassificationTask",
    "NonFiniteError",
    "ProjectionConfig",
    "RegressionTask",
    "RowFeatures",
    "Segment",
    "SourceAttributor",
    "SourceConfig",
    "Task",
    "TaskSpec",
    "TrainSettings",
    "LearningRateRecorder",
    "Trajectory",
    "TrajectoryError",
    "project",
    "scheduled_rates",
    "train_adamw",
    "train_sgd",
]
