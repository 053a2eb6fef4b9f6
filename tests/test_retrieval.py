"""Exact and IVF top-k against brute-force torch.topk over dense float64 scores."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from source_proj import retrieval
from source_proj.ivf import ApproxIndex, IVFSettings, StaleIndexError, build_ivf, index_dir, recall_at_k
from source_proj.retrieval import SearchSettings, TopK, exact_proponents_opponents, exact_topk
from source_proj.store import FeatureStore, StoreIncompleteError, StoreLayout
from store_helpers import METADATA, chunk_features, dense_store

# faiss accumulates in float32: a score may differ from the float64 oracle by about
# D * 2^-24 * |q| |f|; REL_TOL |q| |f| is a safe bound for D <= 32 and is what counts as a tie.
REL_TOL = 1e-5


def assert_matches_topk(found: TopK, queries: np.ndarray, features: np.ndarray, k: int, largest: bool) -> None:
    """``found`` equals ``torch.topk`` over the dense float64 scores, ties aside."""
    dense = torch.from_numpy(queries).double() @ torch.from_numpy(features).double().T
    values, ids = (t.numpy() for t in torch.topk(dense, k + 1, dim=1, largest=largest))
    dense = dense.numpy()
    tol = REL_TOL * np.linalg.norm(queries, axis=1)[:, None] * np.linalg.norm(features, axis=1)[None, :]
    assert found.ids.shape == found.scores.shape == (dense.shape[0], k)
    assert all(len(set(row)) == k for row in found.ids)
    # The reported scores are the true scores of the reported rows, and rank by rank equal
    # to the oracle's top-k values.
    found_tol = np.take_along_axis(tol, found.ids, 1)
    oracle_tol = np.take_along_axis(tol, ids, 1)
    assert np.all(np.abs(found.scores - np.take_along_axis(dense, found.ids, 1)) <= found_tol)
    assert np.all(np.abs(found.scores - values[:, :k]) <= np.maximum(found_tol, oracle_tol[:, :k]))
    # A row whose oracle score is more than the tolerance away from its neighbours' (ranks
    # j - 1 and j + 1, the latter possibly the (k+1)-th) must be at exactly the oracle's rank.
    gap_up = np.abs(np.diff(values, axis=1, prepend=np.inf if largest else -np.inf))[:, :k]
    gap_down = np.abs(np.diff(values, axis=1))
    distinct = (gap_up > 2 * np.maximum(oracle_tol[:, :k], np.roll(oracle_tol, 1, axis=1)[:, :k])) & (
        gap_down > 2 * np.maximum(oracle_tol[:, :k], oracle_tol[:, 1:])
    )
    assert distinct.mean() > 0.9  # the comparison below is not vacuous
    np.testing.assert_array_equal(found.ids[distinct], ids[:, :k][distinct])


def _queries(n: int, dim: int, seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


@pytest.fixture(scope="module")
def store_and_features(tmp_path_factory: pytest.TempPathFactory) -> tuple[FeatureStore, np.ndarray]:
    features = chunk_features(0, 1000, 16)
    return dense_store(tmp_path_factory.mktemp("r") / "s.zarr", features, chunk_rows=64), features


@pytest.mark.parametrize("k", [1, 10, 200])  # 200 > a shard's 128 rows: results span shards
@pytest.mark.parametrize("sharded", [True, False])  # 8 shards of 128 rows / one flat shard
def test_exact_topk_equals_torch_topk(store_and_features, k: int, sharded: bool, monkeypatch) -> None:
    store, features = store_and_features
    queries = _queries(9, 16)
    if sharded:  # and BLAS blocks of 50 rows x 4 queries inside the shards
        settings = SearchSettings(shard_rows=100, block_rows=50)
        monkeypatch.setattr(retrieval, "_QUERY_BLOCK", 4)
    else:
        settings = SearchSettings(shard_rows=10**6)
    proponents = exact_topk(store, queries, k, settings=settings, progress=False)
    opponents = exact_topk(store, queries, k, opponents=True, settings=settings, progress=False)
    assert_matches_topk(proponents, queries, features, k, largest=True)
    assert_matches_topk(opponents, queries, features, k, largest=False)
    assert np.all(proponents.scores[:, :1] > 0) and np.all(opponents.scores[:, :1] < 0)
    one_pass = exact_proponents_opponents(store, queries, k, settings=settings, progress=False)
    assert_matches_topk(one_pass[0], queries, features, k, largest=True)
    assert_matches_topk(one_pass[1], queries, features, k, largest=False)


def test_exact_topk_on_segments(tmp_path: Path) -> None:
    features = chunk_features(0, 500, 8)
    segments = chunk_features(0, 500, 3 * 8, seed=1).reshape(500, 3, 8)
    store = dense_store(tmp_path / "s.zarr", features, segment_features=segments)
    queries = _queries(6, 8)
    stage = segments[:, [0, 2]].astype(np.float64).sum(axis=1)
    found = exact_topk(store, queries, 15, segments=[0, 2], settings=SearchSettings(shard_rows=100), progress=False)
    assert_matches_topk(found, queries, stage, 15, largest=True)


def test_exact_topk_rejects_bad_input(store_and_features, tmp_path: Path) -> None:
    store, _ = store_and_features
    queries = _queries(3, 16)
    for k in (0, 1001, 2.5):
        with pytest.raises(ValueError, match="k must be"):
            exact_topk(store, queries, k, progress=False)
    with pytest.raises(ValueError, match=r"shape \(n_query >= 1, 16\)"):
        exact_topk(store, queries[:, :8], 3, progress=False)
    with pytest.raises(ValueError, match="finite"):
        exact_topk(store, np.full((2, 16), np.nan), 3, progress=False)
    with pytest.raises(ValueError, match="per-segment"):
        exact_topk(store, queries, 3, segments=[0], progress=False)
    empty = FeatureStore.create(tmp_path / "e.zarr", StoreLayout(100, 16), METADATA)
    with pytest.raises(StoreIncompleteError):
        exact_topk(empty, queries, 3, progress=False)


# ------------------------------------------------------------------------------- IVF
def _clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Rows scattered around 16 directions with varied norms (IVF needs some structure)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((16, dim))
    rows = centers[rng.integers(0, 16, n)] + 0.5 * rng.standard_normal((n, dim))
    return (rows * rng.lognormal(0.0, 0.3, (n, 1))).astype(np.float32)


@pytest.fixture(scope="module")
def clustered_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[FeatureStore, np.ndarray]:
    features = _clustered(3000, 16, seed=0)
    return dense_store(tmp_path_factory.mktemp("ivf") / "c.zarr", features, chunk_rows=256), features


def test_recall_at_k_counts_set_overlap() -> None:
    rng = np.random.default_rng(0)
    exact = np.stack([rng.permutation(50)[:10] for _ in range(20)])
    found = np.stack([rng.permutation(50)[:10] for _ in range(20)])
    by_sets = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)])
    assert recall_at_k(found, exact) == pytest.approx(by_sets)
    assert recall_at_k(exact, exact) == 1.0


def test_ivf_searching_every_cell_is_exact(clustered_store) -> None:
    store, features = clustered_store
    index = build_ivf(store, IVFSettings(n_lists=12, codec="flat", train_rows=3000, n_probe=12), progress=False)
    queries = _clustered(20, 16, seed=1)
    assert_matches_topk(index.search(queries, 10), queries, features, 10, largest=True)
    assert_matches_topk(index.search(queries, 10, opponents=True), queries, features, 10, largest=False)
    with pytest.raises(ValueError, match="n_probe"):
        index.search(queries, 10, n_probe=13)


def test_ivf_tune_save_load_and_staleness(clustered_store, tmp_path: Path) -> None:
    store, features = clustered_store
    settings = IVFSettings(n_lists=32, codec="fp16", train_rows=3000, n_probe=1)
    index = build_ivf(store, settings, progress=False)
    queries = _clustered(60, 16, seed=2)
    exact = exact_proponents_opponents(store, queries, 10, progress=False)
    recall = index.tune(queries, *exact, target=0.9, max_fraction=1.0)
    assert recall["k"] == 10 and recall["n_queries"] == 60 and recall["target"] == 0.9
    # Independent recount of each kind's recall at its chosen n_probe, and minimality.
    for truth, opp, kind in ((exact[0], False, "proponents"), (exact[1], True, "opponents")):
        n_probe = index.n_probe[kind]
        assert recall[kind]["n_probe"] == n_probe < 32  # cheaper than searching everything
        overlap = np.mean([len(set(f) & set(t)) for f, t in zip(index.search(queries, 10, opponents=opp).ids, truth.ids)])
        assert recall[kind]["recall"] == pytest.approx(overlap / 10) and overlap / 10 >= 0.9
        assert recall[kind]["reached"] and index.worth_using(opp)
        if n_probe > 1:
            fewer = index.search(queries, 10, opponents=opp, n_probe=n_probe // 2).ids
            assert recall_at_k(fewer, truth.ids) < 0.9

    # Probing at most one cell of 32 cannot give perfect recall here: the index says so.
    capped = ApproxIndex(index.index, settings, index.store_token, {}, {}).tune(
        queries, *exact, target=1.0, max_fraction=1 / 32
    )
    for kind in ("proponents", "opponents"):
        assert capped[kind]["n_probe"] == 1 and capped[kind]["reached"] is (capped[kind]["recall"] >= 1.0)
    assert not capped["proponents"]["reached"]

    where = index.save(store)
    assert where == index_dir(store) == store.path.with_name("c.zarr.ivf")
    for mmap in (False, True):
        loaded = ApproxIndex.load(FeatureStore.open(store.path), settings, mmap=mmap)
        assert loaded.n_probe == index.n_probe and loaded.recall == index.recall
        for opp in (False, True):
            a, b = loaded.search(queries, 10, opponents=opp), index.search(queries, 10, opponents=opp)
            np.testing.assert_array_equal(a.ids, b.ids)
            np.testing.assert_array_equal(a.scores, b.scores)
    with pytest.raises(StaleIndexError, match="built with"):
        ApproxIndex.load(store, IVFSettings(n_lists=16))

    # The same path now holds a different store: the saved index must not be used.
    moved = tmp_path / "c.zarr"
    remade = dense_store(moved, features + 1.0, chunk_rows=256)
    shutil.copytree(where, index_dir(remade))
    with pytest.raises(StaleIndexError, match="other content"):
        ApproxIndex.load(remade)
    with pytest.raises(FileNotFoundError):
        ApproxIndex.load(dense_store(tmp_path / "fresh.zarr", features[:100]))
