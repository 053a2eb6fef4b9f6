"""``source-proj curate``: its files against the curation API on the attributor's in-memory results."""

from __future__ import annotations

import csv
import io
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from source_proj.attributor import SourceAttributor
from source_proj.cli.main import main
from source_proj.cli.task_spec import load_task
from source_proj.config import SourceConfig
from source_proj.curation import CurationConfig, CurationTable, curate, final_losses
from source_proj.retrieval.group import group_influence

# Store (float32) and in-memory scores agree to float32 round-off: 1e-5 of |Q| |F|.
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
                        queries=blobs(7, 4, 3, seed=9), query_sets={{"validation": blobs(11, 4, 3, seed=5)}},
                        config={{"num_segments": 2, "proj_dim": 16}})
    """
)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    folder = tmp_path_factory.mktemp("curate")
    task_file = folder / "task.py"
    task_file.write_text(TASK_FILE.format(tests=str(Path(__file__).parent)))
    store = folder / "feats.zarr"
    assert main(["fit", "--task", f"{task_file}:task", "--store", str(store), "--chunk-rows", "16", "--quiet"]) == 0
    return f"{task_file}:task", store


def _memory(task_ref: str) -> tuple[SourceAttributor, object]:
    spec = load_task(task_ref)
    config = SourceConfig(**{**spec.config, "progress": False})
    return SourceAttributor(spec.model, spec.task, spec.trajectory, config).fit(spec.train), spec


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_curate_writes_the_table_mask_and_weights_of_the_api(fitted: tuple[str, Path], tmp_path: Path, fmt: str) -> None:
    task_ref, store = fitted
    out = tmp_path / "cur"
    code = main(["curate", "--task", task_ref, "--store", str(store), "--against", "validation", "--out", str(out),
                 "--flag-fraction", "0.1", "--weight-floor", "0.2", "--format", fmt, "--quiet"])
    assert code == 0
    table = CurationTable.read(out / f"curation.{fmt}")
    keep, weights = np.load(out / "keep.npy"), np.load(out / "weights.npy")
    np.testing.assert_array_equal(keep, table.keep_mask())
    np.testing.assert_array_equal(weights, table.weights())
    assert keep.dtype == np.bool_ and keep.sum() == 54 and weights.min() >= 0.2

    attributor, spec = _memory(task_ref)
    validation = spec.query_sets["validation"]
    q = attributor.query_features(validation, measurement=attributor.task.loss)
    harm = (q.double() @ attributor.train_features.double().T).sum(0).numpy()  # the explicit (11, 60) matrix
    bound = REL_TOL * q.double().norm(dim=1).sum() * attributor.train_features.double().norm(dim=1)
    assert np.all(np.abs(table.column("harm") - harm) <= bound.numpy())
    np.testing.assert_allclose(table.column("self_influence"), attributor.self_influence().numpy(), rtol=1e-5)
    expected = curate(self_influence=attributor.self_influence().numpy(), losses=final_losses(attributor, spec.train, progress=False),
                      harm=group_influence(attributor.train_features, q, progress=False), labels=spec.train[1].numpy(),
                      config=CurationConfig(flag_fraction=0.1, weight_floor=0.2))
    assert table.ranking is None and expected.ranking == "combined"
    np.testing.assert_array_equal(table.column("label"), spec.train[1].numpy())
    np.testing.assert_allclose(table.column("loss"), expected.column("loss"), rtol=1e-6)
    # Rankings are rank averages: the two agree except where float32 round-off swaps near-ties.
    assert np.mean(table.column("flag") == expected.column("flag")) >= 0.95


def test_curate_explain_lists_the_queries_a_row_helps_and_hurts(fitted: tuple[str, Path], capsys: pytest.CaptureFixture) -> None:
    task_ref, store = fitted
    code = main(["curate", "--task", task_ref, "--store", str(store), "--against", "validation", "--explain", "5",
                 "-k", "3", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    records = list(csv.DictReader(io.StringIO(out)))
    attributor, spec = _memory(task_ref)
    q = attributor.query_features(spec.query_sets["validation"], measurement=attributor.task.loss)
    effects = (q.double() @ attributor.train_features[5].double()).numpy()  # change of each query's loss
    tol = REL_TOL * float(q.double().norm(dim=1).max() * attributor.train_features[5].double().norm())
    for kind, order in (("helps", np.argsort(effects)), ("hurts", np.argsort(-effects))):
        mine = [r for r in records if r["effect"] == kind]
        assert [int(r["rank"]) for r in mine] == [1, 2, 3] and all(r["train_id"] == "5" for r in mine)
        for r, expected in zip(mine, order[:3]):
            assert abs(float(r["loss_change"]) - effects[expected]) <= tol
            assert abs(effects[int(r["query"])] - effects[expected]) <= 2 * tol  # the same query, ties aside


def test_curate_reports_bad_requests(fitted: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    task_ref, store = fitted
    base = ["curate", "--task", task_ref, "--store", str(store), "--quiet"]
    assert main([*base, "--against", "test", "--out", str(tmp_path)]) == 2
    assert "no query set 'test'; it has ['queries', 'validation']" in capsys.readouterr().err
    assert main([*base, "--explain", "3"]) == 2
    assert "--explain ROW needs --against" in capsys.readouterr().err
    assert main([*base, "--against", "queries", "--explain", "60"]) == 2
    assert "row must be a training row in [0, 60)" in capsys.readouterr().err
    assert main([*base, "--rank-by", "harm", "--out", str(tmp_path)]) == 2
    assert "rank_by='harm' needs ['harm']" in capsys.readouterr().err
    # Without --against: ranked by held-out loss, the sum of the two signal columns.
    assert main([*base, "--out", str(tmp_path / "self")]) == 0
    table = CurationTable.read(tmp_path / "self" / "curation.csv")
    np.testing.assert_allclose(table.column("score"), table.column("loss") + table.column("self_influence"), rtol=1e-12)
    assert "harm" not in table.columns and torch.as_tensor(table.weights()).shape == (60,)
