"""Outputs that cannot lie: damaged score blocks are found and recomputed, curation files are
replaced all together or not at all, --explain splits queries by the sign of their loss change,
and weights agree with flags for every N."""

from __future__ import annotations

import csv
import errno
import io
import os
from pathlib import Path

import numpy as np
import pytest
import zarr
from store_helpers import chunk_features, dense_store
from test_cli_curate import _memory, fitted  # noqa: F401 - the fixture: a store fitted by the CLI

from source_proj.cli.main import main
from source_proj.curation import CurationConfig, curate, outputs
from source_proj.features.ledger import ChunkLedger, chunk_digest, create_group_atomically
from source_proj.features.store import FeatureStore
from source_proj.retrieval.bulk import ATTRS_KEY, OldOutputError, check_output, score_matrix, self_influence

# float32 products of length D <= 16 are within 1e-5 |q| |f| of the float64 oracle.
REL_TOL_F32 = 1e-5


def _reads(store: FeatureStore) -> list[int]:
    """Record the first row of every chunk ``store.read_rows`` reads from now on."""
    reads: list[int] = []
    original = store.read_rows

    def read_rows(start, stop, segments=None):
        reads.append(start)
        return original(start, stop, segments)

    store.read_rows = read_rows  # type: ignore[method-assign]
    return reads


def _one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------ 6. score outputs
@pytest.mark.parametrize("damage", ["delete", "overwrite", "truncate"])
def test_a_damaged_score_block_is_found_and_recomputed(tmp_path: Path, damage: str) -> None:
    features = chunk_features(0, 300, 16)
    dense_store(tmp_path / "s.zarr", features, chunk_rows=64)  # 5 row chunks
    queries = np.random.default_rng(5).standard_normal((7, 16)).astype(np.float32)
    out = tmp_path / "o.zarr"
    score_matrix(FeatureStore.open(tmp_path / "s.zarr"), queries, out, query_block=3, progress=False)
    assert check_output(out).damaged == {} and check_output(out).pending == []

    block = out / "scores" / "c" / "1" / "2"  # queries 3-5 of training rows 128-191
    if damage == "delete":
        block.unlink()
    elif damage == "overwrite":
        block.write_bytes(np.ones(3 * 64, dtype=np.float32).tobytes())
    else:
        block.write_bytes(block.read_bytes()[:100])
    found = check_output(out).damaged
    assert list(found) == [2] and str(block) in found[2]
    assert ("is missing" in found[2]) == (damage == "delete")

    store = FeatureStore.open(tmp_path / "s.zarr")
    reads, reported = _reads(store), []
    score_matrix(store, queries, out, query_block=3, progress=False, on_damaged=reported.append)
    assert reads == [128] and [list(r) for r in reported] == [[2]]  # only the damaged chunk
    got = zarr.open_group(out, mode="r")["scores"][...]
    dense = queries.astype(np.float64) @ features.astype(np.float64).T
    scale = np.linalg.norm(queries, axis=1)[:, None] * np.linalg.norm(features, axis=1)[None, :]
    assert np.all(np.abs(got - dense) <= REL_TOL_F32 * scale)
    assert check_output(out).damaged == {}


def test_a_deleted_self_influence_chunk_is_found_and_recomputed(tmp_path: Path) -> None:
    features = chunk_features(0, 200, 12)
    store = dense_store(tmp_path / "s.zarr", features, chunk_rows=64)  # 4 chunks
    self_queries = chunk_features(0, 200, 12, seed=7)
    calls: list[int] = []

    def self_query_chunk(start: int, stop: int) -> np.ndarray:
        calls.append(start)
        return self_queries[start:stop]

    self_influence(store, self_query_chunk, tmp_path / "si.zarr", progress=False)
    (tmp_path / "si.zarr" / "self_influence" / "c" / "3").unlink()
    assert list(check_output(tmp_path / "si.zarr").damaged) == [3]
    calls.clear()
    values = self_influence(store, self_query_chunk, tmp_path / "si.zarr", progress=False)
    assert calls == [192]
    oracle = np.einsum("ij,ij->i", self_queries.astype(np.float64), features.astype(np.float64))
    np.testing.assert_allclose(values, oracle, rtol=1e-12, atol=0)


def test_score_outputs_of_the_old_layout_are_refused(tmp_path: Path) -> None:
    features = chunk_features(0, 128, 8)
    store = dense_store(tmp_path / "s.zarr", features, chunk_rows=64)
    queries = np.random.default_rng(6).standard_normal((4, 8)).astype(np.float32)
    out = tmp_path / "old.zarr"
    # The older writer: same description without the ledger key, one bounds digest per chunk.
    description = {"kind": "score_matrix", "store_token": store.content_token(),
                   "queries_digest": f"{chunk_digest(queries):016x}", "segments": None, "query_block": 4}

    def build(group: zarr.Group) -> None:
        scores = group.create_array("scores", shape=(4, 128), dtype="float32", chunks=(4, 64), fill_value=0)
        ledger = ChunkLedger.create(group, "chunk_digest", 2)
        for index, (start, stop) in enumerate([(0, 64), (64, 128)]):
            scores[:, start:stop] = queries @ features[start:stop].T
            ledger.mark(index, [chunk_digest(np.array([index, start, stop]))])

    create_group_atomically(out, {ATTRS_KEY: description}, build)
    for call in (lambda: score_matrix(store, queries, out, query_block=4, progress=False), lambda: check_output(out)):
        with pytest.raises(OldOutputError, match="older source_proj.*cannot be detected.*delete"):
            call()
    np.testing.assert_allclose(zarr.open_group(out, mode="r")["scores"][...], queries @ features.T, rtol=1e-6)


def test_cli_score_rerun_recomputes_a_deleted_block(fitted: tuple[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    task_ref, store = fitted
    base = ["score", "--task", task_ref, "--store", str(store), "--query-block", "3", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "fresh.zarr")]) == 0
    assert main([*base, "--out", str(tmp_path / "o.zarr")]) == 0
    block = tmp_path / "o.zarr" / "scores" / "c" / "2" / "1"  # query 6, training rows 16-31
    block.unlink()
    capsys.readouterr()
    assert main(["verify", "--store", str(tmp_path / "o.zarr"), "--quiet"]) == 1
    assert f"{block} is missing" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "o.zarr")]) == 0
    assert "1 written chunks of" in capsys.readouterr().err
    assert main(["verify", "--store", str(tmp_path / "o.zarr"), "--quiet"]) == 0
    assert "complete; every written chunk checked against the digests of its values: no problem found" in (
        capsys.readouterr().err)
    fresh = zarr.open_group(tmp_path / "fresh.zarr", mode="r")["scores"][...]
    got = zarr.open_group(tmp_path / "o.zarr", mode="r")["scores"][...]
    assert np.all(got[6, 16:32] != 0)
    np.testing.assert_array_equal(got, fresh)


# ------------------------------------------------------------------ 7. atomic curate outputs
def _curate(task_ref: str, store: Path, out: Path, fraction: str) -> int:
    return main(["curate", "--task", task_ref, "--store", str(store), "--out", str(out), "--flag-fraction", fraction,
                 "--quiet"])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_full_disk_leaves_the_previous_curation_outputs_intact(
    fitted: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    task_ref, store = fitted
    out = tmp_path / "cur"
    assert _curate(task_ref, store, out, "0.1") == 0
    before = _snapshot(out)
    assert sorted(before) == ["curation.csv", "keep.npy", "weights.npy"]

    def full_disk(path, array) -> None:  # keep.npy, the second file: half written, then ENOSPC
        Path(path).write_bytes(b"\x93NUMPY")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(outputs.np, "save", full_disk)
    capsys.readouterr()
    assert _curate(task_ref, store, out, "0.3") == 2
    err = _one_error_line(capsys)
    assert "No space left on device" in err and "keep.npy" in err
    assert _snapshot(out) == before and sorted(os.listdir(out)) == sorted(before)  # no temporaries left
    monkeypatch.undo()
    assert _curate(task_ref, store, out, "0.3") == 0
    assert np.load(out / "keep.npy").sum() == 42 and _snapshot(out) != before


def test_a_folder_in_place_of_keep_npy_changes_nothing(
    fitted: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    task_ref, store = fitted
    out = tmp_path / "cur"
    assert _curate(task_ref, store, out, "0.1") == 0
    (out / "keep.npy").unlink()
    (out / "keep.npy").mkdir()
    before = _snapshot(out)
    capsys.readouterr()
    assert _curate(task_ref, store, out, "0.3") == 2
    assert "keep.npy: it is a folder" in _one_error_line(capsys)
    assert _snapshot(out) == before and (out / "keep.npy").is_dir()
    assert sorted(os.listdir(out)) == ["curation.csv", "keep.npy", "weights.npy"]


# ------------------------------------------------------------------ 8. --explain by sign
def test_explain_with_fewer_than_2k_queries_splits_them_by_sign(
    fitted: tuple[str, Path], capsys: pytest.CaptureFixture
) -> None:
    task_ref, store = fitted
    k = 10  # 11 validation queries < 2k
    assert main(["curate", "--task", task_ref, "--store", str(store), "--against", "validation", "--explain", "5",
                 "-k", str(k), "--quiet"]) == 0
    records = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    # Oracle: the in-memory attributor's loss-query scores of row 5 (the change of each query's loss).
    attributor, spec = _memory(task_ref)
    q = attributor.query_features(spec.query_sets["validation"], measurement=attributor.task.loss)
    effects = (q.double() @ attributor.train_features[5].double()).numpy()
    tol = REL_TOL_F32 * float(q.double().norm(dim=1).max() * attributor.train_features[5].double().norm())
    helps = [int(r["query"]) for r in records if r["effect"] == "helps"]
    hurts = [int(r["query"]) for r in records if r["effect"] == "hurts"]
    assert not set(helps) & set(hurts) and len(helps) <= k and len(hurts) <= k
    assert all(effects[i] < tol for i in helps) and all(effects[i] > -tol for i in hurts)
    clear_helps, clear_hurts = set(np.flatnonzero(effects < -tol)), set(np.flatnonzero(effects > tol))
    assert clear_helps <= set(helps) and clear_hurts <= set(hurts)  # none left out: both have <= k
    assert clear_helps and clear_hurts  # the fault needs both signs present
    for r in records:  # listed changes carry the sign of their list, helps most negative first
        assert (float(r["loss_change"]) < 0) == (r["effect"] == "helps")
    changes = [float(r["loss_change"]) for r in records if r["effect"] == "helps"]
    assert changes == sorted(changes)


# ------------------------------------------------------------------ 10b. weights vs flags
def test_weights_follow_flags_for_one_and_two_rows() -> None:
    config = CurationConfig(flag_fraction=0.05, weight_floor=0.2, weight_width=2.0)
    one = curate(harm=np.array([3.7]), config=config)
    assert one.column("flag").tolist() == [True] and one.weights().tolist() == [0.2]  # was 1.0
    two = curate(harm=np.array([1.0, 5.0]), config=config)
    # Threshold 1.0, spread 1.4826 * MAD = 1.4826 * 2: 1 - 4 / (2 * 2.9652) = 1 - 1 / 1.4826.
    assert two.column("flag").tolist() == [False, True]
    np.testing.assert_allclose(two.weights(), [1.0, 1 - 1 / 1.4826], rtol=1e-12)
    tied = curate(harm=np.array([2.0, 2.0]), config=config)
    assert tied.column("flag").tolist() == [True, False] and tied.weights().tolist() == [0.2, 1.0]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_a_row_is_down_weighted_exactly_when_flagged(n: int) -> None:
    rng = np.random.default_rng(n)
    for scores in (rng.standard_normal(n), rng.integers(0, 2, n).astype(float)):  # with and without ties
        for fraction in (0.05, 0.5, 1.0):
            table = curate(harm=scores, config=CurationConfig(flag_fraction=fraction))
            np.testing.assert_array_equal(table.weights() < 1, table.column("flag"))
