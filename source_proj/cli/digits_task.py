"""The digits demo as a ``--task`` for the command line (and an example of one)::

    source-proj fit  --task source_proj.cli.digits_task:task --store digits.zarr --proj-dim 256
    source-proj topk --task source_proj.cli.digits_task:task --store digits.zarr -k 5

Trains the demo's MLP on scikit-learn's digits on first use, keeping its checkpoints in the
directory ``$SOURCE_PROJ_DEMO_DIR/checkpoints`` (default ``source-proj-demo/checkpoints``,
shared with ``source-proj demo``), and returns the 1500 training digits as training rows and
the 297 test digits as queries.
"""

from __future__ import annotations

import os
from pathlib import Path

from source_proj.cli.demo import digits_run
from source_proj.cli.task_spec import TaskSpec


def task() -> TaskSpec:
    """The digits run: MLP, SGD-with-momentum trajectory, training and test digits."""
    run = digits_run(Path(os.environ.get("SOURCE_PROJ_DEMO_DIR", "source-proj-demo")) / "checkpoints")
    return TaskSpec(model=run.model, task="classification", trajectory=run.trajectory, train=run.train, queries=run.test)
