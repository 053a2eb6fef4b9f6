"""The command line on a Hugging Face run: a task file returning a GPT-2 and a
``datasets.Dataset``, with text columns in the output."""

from __future__ import annotations

import csv
import io
import json
import textwrap

import pytest
import torch

from source_proj.cli.main import main
from source_proj.cli.task_spec import TaskSpecError, load_task
from source_proj.config import SourceConfig

pytest.importorskip("transformers")

TASK_FILE = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import datasets
    from lm_helpers import random_rows, tiny_gpt2, train_lm
    from source_proj.cli.task_spec import TaskSpec

    def _data(rows):
        ids = [r["input_ids"] for r in rows]
        return datasets.Dataset.from_dict({{"input_ids": ids, "text": ["".join("abcdefghij"[t] for t in s) for s in ids]}})

    def task():
        model = tiny_gpt2()
        train = random_rows(9, 10, (3, 7), seed=0, masked=False)
        trajectory = train_lm(model, train, epochs=2)
        return TaskSpec(model=model, task="causal_lm", trajectory=trajectory, train=_data(train),
                        queries=_data(random_rows(3, 10, (3, 7), seed=1, masked=False)),
                        config={{"num_segments": 2, "proj_dim": 32}}, train_text="text", query_text="text",
                        param_names=["transformer.h.*", "lm_head"])

    def wrong_texts():
        spec = task()
        return TaskSpec(**{{**spec.__dict__, "train_text": ["only one"]}})
    """
)


def test_cli_fits_and_explains_a_gpt2_on_a_datasets_dataset_with_text_columns(tmp_path, capsys):
    from pathlib import Path

    path = tmp_path / "lm_task.py"
    path.write_text(TASK_FILE.format(tests=str(Path(__file__).parent)))
    ref = f"{path}:task"
    store = str(tmp_path / "lm.zarr")
    assert main(["fit", "--task", ref, "--store", store, "--quiet"]) == 0
    assert main(["topk", "--task", ref, "--store", store, "-k", "3", "--quiet", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert list(rows[0]) == ["query", "query_text", "kind", "rank", "train_id", "train_text", "score"]
    # The same run in memory: ids, scores and texts agree.
    spec = load_task(ref)
    att = spec.attributor(SourceConfig(**spec.config, progress=False)).fit(spec.train)
    assert att.model_fn.names == tuple(n for n, _ in spec.model.named_parameters() if n.startswith("transformer.h.")
                                       or n == "transformer.wte.weight")
    scores = att.score(spec.queries)
    for r in rows:
        q, m = int(r["query"]), int(r["train_id"])
        assert r["query_text"] == spec.queries["text"][q] and r["train_text"] == spec.train["text"][m]
        assert float(r["score"]) == pytest.approx(float(scores[q, m]), rel=1e-4, abs=1e-7)
    top = [int(r["train_id"]) for r in rows if r["query"] == "0" and r["kind"] == "proponents"]
    assert top == scores[0].argsort(descending=True)[:3].tolist()
    assert main(["self-influence", "--store", store, "--task", ref, "--top", "2", "--format", "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    order = torch.argsort(att.self_influence(), descending=True)[:2].tolist()
    assert [r["train_id"] for r in records] == order
    assert [r["train_text"] for r in records] == [spec.train["text"][m] for m in order]
    with pytest.raises(TaskSpecError, match="1 train texts for 9 train rows"):
        load_task(f"{path}:wrong_texts").texts("train")
