"""source-proj: training data attribution with SOURCE in a random-projection space.

The main entry point is :class:`SourceAttributor`; the feature store, retrieval and evaluation
live in their own modules (``source_proj.store``, ``source_proj.retrieval``,
``source_proj.evaluation``) and are imported on demand.
"""

from source_proj.attributor import RowFeatures, SourceAttributor
from source_proj.config import SourceConfig
from source_proj.gradients import NonFiniteError
from source_proj.projection import ProjectionConfig, project
from source_proj.task_spec import TaskSpec
from source_proj.tasks import ClassificationTask, RegressionTask, Task
from source_proj.training import TrainSettings, train_sgd
from source_proj.trajectory import Checkpoint, Segment, Trajectory, TrajectoryError

__version__ = "0.1.0"

__all__ = [
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
    "Trajectory",
    "TrajectoryError",
    "project",
    "train_sgd",
]
