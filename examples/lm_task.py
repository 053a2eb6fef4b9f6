"""A command-line task file for a language model (``--task examples/lm_task.py:task``).

The function ``task`` returns a ``TaskSpec``: the model, the task, the trajectory of its
Trainer run, the training rows and the queries, with their text for the output files. It
trains the tiny GPT-2 of ``hf_trainer_lm.py`` into ``$SOURCE_EXAMPLE_RUN`` (default
``lm-run/``) the first time and reuses it afterwards::

    source-proj fit  --task examples/lm_task.py:task --store lm.zarr
    source-proj topk --task examples/lm_task.py:task --store lm.zarr -k 3 --json
    source-proj self-influence --task examples/lm_task.py:task --store lm.zarr --top 5

(For a Trainer directory and data files alone, ``--run DIR --train FILE`` needs no task file.)
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # hf_trainer_lm.py beside this file

from hf_trainer_lm import dataset, sequences, train  # noqa: E402

from source_proj import CausalLMTask, trainer_trajectory  # noqa: E402
from source_proj.cli.task_spec import TaskSpec  # noqa: E402


def task() -> TaskSpec:
    """The tiny GPT-2 run, its training sequences and one held-out sequence of each kind."""
    output_dir = os.environ.get("SOURCE_EXAMPLE_RUN", "lm-run")
    model, train_rows, kinds = train(output_dir)
    query_texts, query_kinds = sequences(1, seed=1)
    return TaskSpec(
        model=model.eval(),
        task=CausalLMTask(reduction="mean"),
        trajectory=trainer_trajectory(output_dir, model=model),
        train=train_rows,
        queries=dataset(query_texts),
        train_text=kinds,  # written beside each training id in topk / self-influence output
        query_text=query_kinds,
        config={"proj_dim": 128},
    )
