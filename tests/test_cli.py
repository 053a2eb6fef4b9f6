"""The store commands of ``source-proj`` against the attributor's own in-memory results."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from source_proj.attributor import SourceAttributor
from source_proj.cli.main import main
from source_proj.cli.task_spec import TaskSpecError, load_task
from source_proj.config import SourceConfig

# Store and faiss work in float32: scores agree with the attributor's torch float32 ones to
# about D * 2^-24 relative to |Q[q]| |F[m]|; 1e-5 of that is what we allow (and call a tie).
REL_TOL = 1e-5

TASK_FILE = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from tiny_models import blobs, trained_classifier
    from source_proj.cli.task_spec import TaskSpec

    def task():
        model, trajectory, train = trained_classifier(n=60, epochs=3)
        return TaskSpec(model=model, task="classification", trajectory=trajectory, train=train,
                        queries=blobs(7, 4, 3, seed=9), config={{"num_segments": 2}})

    def not_a_task():
        return 42
    """
)


@pytest.fixture(scope="module")
def task_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("task") / "tiny_task.py"
    path.write_text(TASK_FILE.format(tests=str(Path(__file__).parent)))
    return path


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _reference(task_ref: str, **config: object) -> tuple[SourceAttributor, torch.Tensor, object]:
    """The attributor fitted in memory with the same settings, its scores and the spec."""
    spec = load_task(task_ref)
    settings = SourceConfig(**{**spec.config, **config, "progress": False})
    attributor = SourceAttributor(spec.model, spec.task, spec.trajectory, settings).fit(spec.train)
    return attributor, attributor.query_features(spec.queries), spec


def check_topk_records(records: list[dict], q_features: torch.Tensor, features: torch.Tensor, k: int) -> None:
    """Parsed topk rows equal torch.topk over the attributor's dense scores, ties aside."""
    dense = q_features.double() @ features.double().T
    tol = (REL_TOL * q_features.double().norm(dim=1)[:, None] * features.double().norm(dim=1)[None, :]).numpy()
    n_distinct = 0
    for kind, sign in (("proponents", 1.0), ("opponents", -1.0)):
        values, ids = (t.numpy() for t in torch.topk(sign * dense, k + 1, dim=1))
        rows = sorted((r for r in records if r["kind"] == kind), key=lambda r: (r["query"], r["rank"]))
        assert len(rows) == dense.shape[0] * k
        for q in range(dense.shape[0]):
            mine = rows[q * k : (q + 1) * k]
            assert [r["rank"] for r in mine] == list(range(1, k + 1))
            t = 2 * tol[q].max()
            for j, r in enumerate(mine):
                train_id, score = int(r["train_id"]), float(r["score"])
                assert abs(score - float(dense[q, train_id])) <= tol[q, train_id]  # its true score
                assert abs(sign * score - values[q, j]) <= t  # the oracle's j-th best value
                if (j == 0 or values[q, j - 1] - values[q, j] > t) and values[q, j] - values[q, j + 1] > t:
                    assert train_id == ids[q, j]
                    n_distinct += 1
    assert n_distinct > 0.8 * 2 * dense.shape[0] * k  # the id comparison is not vacuous


def test_fit_topk_score_self_influence_round_trip(task_file: Path, tmp_path: Path, capsys) -> None:
    ref = f"{task_file}:task"
    store = str(tmp_path / "feats.zarr")
    code, _, err = _run(capsys, "fit", "--task", ref, "--store", store, "--proj-dim", "16", "--chunk-rows", "16",
                        "--quiet")
    assert code == 0, err
    assert "60 training rows x 32 features" in err  # auto: per-segment query, L = 2 and "4 chunks computed now, 0 found done" in err
    attributor, q_features, spec = _reference(ref, proj_dim=16)

    code, out, err = _run(capsys, "topk", "--task", ref, "--store", store, "-k", "5", "--quiet")
    assert code == 0, err
    csv_records = list(csv.DictReader(io.StringIO(out)))
    assert list(csv_records[0]) == ["query", "kind", "rank", "train_id", "score"]
    check_topk_records(
        [{**r, "query": int(r["query"]), "rank": int(r["rank"])} for r in csv_records],
        q_features, attributor.train_features, 5,
    )
    json_path = tmp_path / "top.json"
    code, _, err = _run(capsys, "topk", "--task", ref, "--store", store, "-k", "5", "--format", "json",
                        "--output", str(json_path), "--quiet")
    assert code == 0, err
    assert json.loads(json_path.read_text()) == [
        {**r, "query": int(r["query"]), "rank": int(r["rank"]), "train_id": int(r["train_id"]),
         "score": float(r["score"])}
        for r in csv_records
    ]
    code, out, err = _run(capsys, "topk", "--task", ref, "--store", store, "-k", "5", "--kind", "opponents", "--quiet")
    assert code == 0, err
    opponents = list(csv.DictReader(io.StringIO(out)))
    both = [r for r in csv_records if r["kind"] == "opponents"]
    assert [r["train_id"] for r in opponents] == [r["train_id"] for r in both]
    np.testing.assert_allclose([float(r["score"]) for r in opponents], [float(r["score"]) for r in both], rtol=1e-5)

    code, _, err = _run(capsys, "score", "--task", ref, "--store", store, "--out", str(tmp_path / "s.zarr"), "--quiet")
    assert code == 0, err
    matrix = zarr.open_group(tmp_path / "s.zarr", mode="r")["scores"][...]
    dense = attributor.score(spec.queries).double().numpy()
    scale = q_features.double().norm(dim=1)[:, None].numpy() * attributor.train_features.double().norm(dim=1).numpy()
    assert np.all(np.abs(matrix - dense) <= REL_TOL * scale)

    code, out, err = _run(capsys, "self-influence", "--store", store, "--top", "10")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    expected = attributor.self_influence().numpy()
    assert [int(r["train_id"]) for r in rows] == np.argsort(-expected, kind="stable")[:10].tolist()
    np.testing.assert_allclose([float(r["self_influence"]) for r in rows], np.sort(expected)[::-1][:10], rtol=1e-12)

    # Running fit again resumes: nothing is recomputed. Other settings are refused.
    code, _, err = _run(capsys, "fit", "--task", ref, "--store", store, "--proj-dim", "16", "--chunk-rows", "16",
                        "--quiet")
    assert code == 0 and "0 chunks computed now, 4 found done" in err
    code, _, err = _run(capsys, "fit", "--task", ref, "--store", store, "--proj-dim", "16", "--seed", "1", "--quiet")
    assert code == 2 and "metadata.projection.seed" in err


@pytest.mark.parametrize("query_mode", ["final", "segment"])
def test_topk_for_one_stage_and_with_ivf(task_file: Path, tmp_path: Path, capsys, query_mode: str) -> None:
    ref = f"{task_file}:task"
    store = str(tmp_path / "seg.zarr")
    code, _, err = _run(capsys, "fit", "--task", ref, "--store", store, "--proj-dim", "8", "--keep-segments",
                        "--query-mode", query_mode, "--dtype", "float16", "--quiet")
    assert code == 0, err
    attributor, q_features, spec = _reference(ref, proj_dim=8, keep_segment_features=True, query_mode=query_mode)
    stage = str(attributor.segments[0].stage)
    code, out, err = _run(capsys, "topk", "--task", ref, "--store", store, "-k", "3", "--stage", stage,
                          "--format", "json", "--quiet")
    assert code == 0, err
    records = json.loads(out)
    stage_scores = attributor.score(spec.queries, stage=attributor.segments[0].stage).double().numpy()
    in_stage = [i for i, seg in enumerate(attributor.segments) if str(seg.stage) == stage]
    stage_features = attributor.train_segment_features[:, in_stage].double().sum(dim=1)
    assert len(records) == 2 * 7 * 3
    for r in records:  # float16 store: within 2^-11 |q| |f| (2 segments summed: twice that)
        bound = 2 * 2.0**-11 * float(q_features[r["query"]].double().norm() * stage_features[r["train_id"]].norm())
        assert abs(r["score"] - stage_scores[r["query"], r["train_id"]]) <= bound + REL_TOL * bound
    code, _, err = _run(capsys, "topk", "--task", ref, "--store", store, "--stage", "nope", "--quiet")
    assert code == 2 and "unknown stage 'nope'" in err

    code, out, err = _run(capsys, "topk", "--task", ref, "--store", store, "-k", "3", "--index", "ivf",
                          "--ivf-recall", "1.0", "--quiet")
    assert code == 0, err
    assert "saved to" in err and (tmp_path / "seg.zarr.ivf").is_dir()
    code, out_again, err = _run(capsys, "topk", "--task", ref, "--store", store, "-k", "3", "--index", "ivf", "--quiet")
    assert code == 0 and "using the IVF index saved beside the store" in err and out_again == out


def test_task_loading_errors(task_file: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(TaskSpecError, match="must look like"):
        load_task("no_colon_here")
    with pytest.raises(TaskSpecError, match="does not exist"):
        load_task(f"{tmp_path / 'missing.py'}:task")
    (tmp_path / "task.txt").write_text("def task():\n    pass\n")
    with pytest.raises(TaskSpecError, match=r"task\.txt cannot be imported: name a Python file"):
        load_task(f"{tmp_path / 'task.txt'}:task")
    with pytest.raises(TaskSpecError, match="no function 'nope'"):
        load_task(f"{task_file}:nope")
    with pytest.raises(TaskSpecError, match="must return a TaskSpec"):
        load_task(f"{task_file}:not_a_task")
    code, _, err = _run(capsys, "topk", "--task", f"{task_file}:task", "--store", str(tmp_path / "none.zarr"))
    assert code == 2 and "no feature store" in err
    code, _, err = _run(capsys, "self-influence", "--store", str(tmp_path / "none.zarr"))
    assert code == 2 and "no feature store" in err


def test_digits_demo_round_trip(tmp_path: Path) -> None:
    """The digits demo task through the command line: fit, then topk parsed back."""
    env = {**os.environ, "SOURCE_PROJ_DEMO_DIR": str(tmp_path / "demo")}
    command = [sys.executable, "-m", "source_proj.cli.main"]
    task = ["--task", "source_proj.cli.digits_task:task", "--store", str(tmp_path / "digits.zarr")]
    fit = subprocess.run([*command, "fit", *task, "--proj-dim", "32", "--curvature-examples", "256", "--quiet"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert fit.returncode == 0, fit.stderr
    top = subprocess.run([*command, "topk", *task, "-k", "5", "--format", "json", "--quiet"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert top.returncode == 0, top.stderr
    records = json.loads(top.stdout)

    os.environ["SOURCE_PROJ_DEMO_DIR"] = env["SOURCE_PROJ_DEMO_DIR"]
    try:
        attributor, q_features, spec = _reference("source_proj.cli.digits_task:task", proj_dim=32, curvature_examples=256)
    finally:
        del os.environ["SOURCE_PROJ_DEMO_DIR"]
    assert {r["query"] for r in records} == set(range(len(spec.queries[1])))
    check_topk_records(records, q_features, attributor.train_features, 5)


def test_fit_and_topk_with_the_factored_projection(task_file: Path, tmp_path: Path, capsys) -> None:
    ref = f"{task_file}:task"
    store = str(tmp_path / "factored.zarr")
    code, _, err = _run(capsys, "fit", "--task", ref, "--store", store, "--proj-dim", "20", "--proj-structure",
                        "factored", "--kronecker-terms", "2", "--quiet")
    assert code == 0, err
    attributor, q_features, _ = _reference(ref, proj_dim=20, proj_structure="factored", kronecker_terms=2)
    from source_proj.features.store import FeatureStore

    assert FeatureStore.open(store).metadata["projection"]["structure"] == "factored"
    code, out, err = _run(capsys, "topk", "--task", ref, "--store", store, "-k", "3", "--quiet")
    assert code == 0, err  # the store's settings rebuild the factored projection for the queries
    records = [{**r, "query": int(r["query"]), "rank": int(r["rank"])} for r in csv.DictReader(io.StringIO(out))]
    check_topk_records(records, q_features, attributor.train_features, 3)
    code, _, err = _run(capsys, "fit", "--task", ref, "--store", store, "--proj-dim", "20", "--quiet")
    assert code == 2 and "metadata.projection" in err  # a dense fit into a factored store
