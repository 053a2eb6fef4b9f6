"""Group influence against the explicit score matrix: float64 oracles and bulk.score_matrix."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from store_helpers import chunk_features, dense_store
from tiny_models import blobs, trained_classifier

from source_proj.attributor import SourceAttributor
from source_proj.retrieval.bulk import score_matrix
from source_proj.retrieval.group import group_influence, query_sum
from source_proj.store_fit import fit_store

# A float32 inner product of length D <= 64 is within 1e-5 |s| |f| of the exact one; a
# float16 store adds at most 2^-11 |s| |f| (source_proj.features.store).
REL_F32 = 1e-5
REL_F16 = 2.0**-11 + 1e-5


def _bound(queries: np.ndarray, features: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """|sum_q w_q Q[q]| |F[m]| per row, float64 (N,)."""
    w = np.ones(len(queries)) if weights is None else weights
    total = (w[:, None] * queries.astype(np.float64)).sum(0)
    return np.linalg.norm(total) * np.linalg.norm(features.astype(np.float64), axis=1)


@pytest.mark.parametrize("dtype, rel", [("float32", REL_F32), ("float16", REL_F16)])
def test_group_influence_is_the_row_sum_of_the_score_matrix(tmp_path: Path, dtype: str, rel: float) -> None:
    features = chunk_features(0, 700, 24)  # norms over several orders of magnitude
    store = dense_store(tmp_path / "s.zarr", features, dtype=dtype, chunk_rows=64)
    queries = np.random.default_rng(0).standard_normal((37, 24)).astype(np.float32)
    dense = queries.astype(np.float64) @ features.astype(np.float64).T  # the float64 score matrix
    got = group_influence(store, queries, block_rows=100, progress=False)
    assert got.shape == (700,) and got.dtype == np.float64
    assert np.all(np.abs(got - dense.sum(0)) <= rel * _bound(queries, features))
    # ... and the row sums of the matrix the bulk scorer writes from the same store.
    score_matrix(store, queries, tmp_path / "scores.zarr", query_block=8, progress=False)
    written = zarr.open_group(tmp_path / "scores.zarr", mode="r")["scores"][...].astype(np.float64)
    per_entry = np.linalg.norm(queries, axis=1)[:, None] * np.linalg.norm(features, axis=1)[None, :]
    assert np.all(np.abs(got - written.sum(0)) <= rel * _bound(queries, features) + REL_F32 * per_entry.sum(0))


def test_group_influence_in_memory_weighted_and_from_query_blocks(tmp_path: Path) -> None:
    features = chunk_features(0, 300, 16, seed=4)
    queries = np.random.default_rng(1).standard_normal((50, 16)).astype(np.float32)
    weights = np.random.default_rng(2).uniform(-1, 2, 50)
    dense = (weights[:, None] * (queries.astype(np.float64) @ features.astype(np.float64).T)).sum(0)
    tol = REL_F32 * _bound(queries, features, weights)
    for source in (features, torch.from_numpy(features)):
        got = group_influence(source, queries, weights=weights, block_rows=64, progress=False)
        assert np.all(np.abs(got - dense) <= tol)
    blocks = (torch.from_numpy(queries[i : i + 7]) for i in range(0, 50, 7))
    unweighted = queries.astype(np.float64) @ features.astype(np.float64).T
    got = group_influence(features, blocks, progress=False)
    assert np.all(np.abs(got - unweighted.sum(0)) <= REL_F32 * _bound(queries, features))
    np.testing.assert_allclose(query_sum(queries, 16, np.full(50, 1 / 50)), queries.astype(np.float64).mean(0), rtol=1e-12)


def test_group_influence_on_segments_and_bad_input(tmp_path: Path) -> None:
    features = chunk_features(0, 200, 8)
    segments = chunk_features(0, 200, 16, seed=1).reshape(200, 2, 8)
    store = dense_store(tmp_path / "s.zarr", features, segment_features=segments)
    queries = np.random.default_rng(3).standard_normal((5, 8)).astype(np.float32)
    got = group_influence(store, queries, segments=[1], progress=False)
    dense = (queries.astype(np.float64) @ segments[:, 1].astype(np.float64).T).sum(0)
    assert np.all(np.abs(got - dense) <= REL_F32 * _bound(queries, segments[:, 1]))
    with pytest.raises(ValueError, match=r"queries must have shape \(n_query >= 1, 8\)"):
        group_influence(store, queries[:, :5], progress=False)
    with pytest.raises(ValueError, match="finite"):
        group_influence(store, np.full((2, 8), np.nan), progress=False)
    with pytest.raises(ValueError, match="weights must be finite with shape"):
        group_influence(store, queries, weights=np.ones(4), progress=False)
    with pytest.raises(ValueError, match="empty"):
        group_influence(store, iter([]), progress=False)
    with pytest.raises(ValueError, match="in-memory features have none"):
        group_influence(features, queries, segments=[0], progress=False)


def test_group_influence_memory_is_bounded_by_blocks(tmp_path: Path) -> None:
    n, dim, n_query = 20_000, 32, 2_000
    features = np.random.default_rng(3).standard_normal((n, dim)).astype(np.float32)
    store = dense_store(tmp_path / "s.zarr", features, chunk_rows=512)
    queries = np.random.default_rng(4).standard_normal((n_query, dim)).astype(np.float32)
    tracemalloc.start()
    group_influence(store, queries, block_rows=1024, progress=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # The score matrix would be 160 MB; a float64 copy of the queries, two blocks of rows and
    # the (N,) result are well under 3 MB.
    assert peak < n_query * n * 4 / 50, f"peak {peak} bytes"


def test_group_influence_of_an_attributor_store_is_the_sum_of_its_scores(tmp_path: Path) -> None:
    model, trajectory, train = trained_classifier(n=60, epochs=3)
    settings = {"proj_dim": 16, "num_segments": 2, "progress": False}
    store, _ = fit_store(SourceAttributor(model, "classification", trajectory, **settings), train, tmp_path / "f.zarr",
                         dtype="float16", chunk_rows=16)
    attributor = SourceAttributor(model, "classification", trajectory, **settings).fit(train)
    queries = blobs(9, 4, 3, seed=9)
    q = attributor.query_features(queries)
    expected = attributor.score(queries).double().sum(0).numpy()  # the attributor's in-memory (9, 60) scores
    bound = np.linalg.norm(q.double().sum(0)) * attributor.train_features.double().norm(dim=1).numpy()
    assert np.all(np.abs(group_influence(store, q, progress=False) - expected) <= REL_F16 * bound + 1e-5 * np.abs(expected))
    in_memory = group_influence(attributor.train_features, q, progress=False)
    assert np.all(np.abs(in_memory - expected) <= REL_F32 * bound + 1e-5 * np.abs(expected))
