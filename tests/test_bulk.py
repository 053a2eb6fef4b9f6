"""Bulk scoring against dense float64 oracles; resumption; bounded memory."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import zarr
from store_helpers import chunk_features, dense_store

from source_proj.features.errors import StoreMismatchError
from source_proj.features.store import FeatureStore
from source_proj.retrieval.bulk import score_matrix, self_influence

# float32 products of length D <= 32 are within 1e-5 |q| |f| of the float64 oracle;
# float16 stores add at most 2^-11 |q| |f| (see source_proj.features.store).
REL_TOL_F32 = 1e-5
REL_TOL_F16 = 2.0**-11 + 1e-5


def _oracle(queries: np.ndarray, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense float64 scores and the per-pair scale |q| |f|."""
    dense = queries.astype(np.float64) @ features.astype(np.float64).T
    return dense, np.linalg.norm(queries, axis=1)[:, None] * np.linalg.norm(features, axis=1)[None, :]


@pytest.mark.parametrize("dtype, rel_tol", [("float32", REL_TOL_F32), ("float16", REL_TOL_F16)])
def test_score_matrix_equals_dense_product(tmp_path: Path, dtype: str, rel_tol: float) -> None:
    features = chunk_features(0, 1000, 16)
    store = dense_store(tmp_path / "s.zarr", features, dtype=dtype, chunk_rows=64)
    queries = np.random.default_rng(0).standard_normal((10, 16)).astype(np.float32)
    scores = score_matrix(store, queries, tmp_path / "scores.zarr", query_block=4, progress=False)
    assert scores.shape == (10, 1000) and scores.dtype == np.float32
    dense, scale = _oracle(queries, features)
    got = zarr.open_group(tmp_path / "scores.zarr", mode="r")["scores"][...]
    assert np.all(np.abs(got - dense) <= rel_tol * scale)


def test_score_matrix_on_segments(tmp_path: Path) -> None:
    features = chunk_features(0, 300, 8)
    segments = chunk_features(0, 300, 16, seed=1).reshape(300, 2, 8)
    store = dense_store(tmp_path / "s.zarr", features, segment_features=segments)
    queries = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    got = score_matrix(store, queries, tmp_path / "o.zarr", segments=[1], progress=False)[...]
    dense, scale = _oracle(queries, segments[:, 1])
    assert np.all(np.abs(got - dense) <= REL_TOL_F32 * scale)


class _Crash(RuntimeError):
    pass


def _crash_after(store: FeatureStore, n_reads: int, reads: list[int]) -> None:
    """Make ``store.read_rows`` record its calls and raise on call ``n_reads + 1``."""
    original = store.read_rows

    def read_rows(start, stop, segments=None):
        if len(reads) == n_reads:
            raise _Crash("simulated crash")
        reads.append(start)
        return original(start, stop, segments)

    store.read_rows = read_rows  # type: ignore[method-assign]


def test_score_matrix_resumes_without_recomputing(tmp_path: Path) -> None:
    features = chunk_features(0, 640, 16)
    dense_store(tmp_path / "s.zarr", features, chunk_rows=64)  # 10 chunks
    queries = np.random.default_rng(2).standard_normal((7, 16)).astype(np.float32)
    first, second = [], []
    crashing = FeatureStore.open(tmp_path / "s.zarr")
    _crash_after(crashing, 4, first)
    with pytest.raises(_Crash):
        score_matrix(crashing, queries, tmp_path / "o.zarr", progress=False)
    resumed = FeatureStore.open(tmp_path / "s.zarr")
    _crash_after(resumed, 100, second)
    got = score_matrix(resumed, queries, tmp_path / "o.zarr", progress=False)[...]
    assert first == [0, 64, 128, 192] and second == list(range(256, 640, 64))
    dense, scale = _oracle(queries, features)
    assert np.all(np.abs(got - dense) <= REL_TOL_F32 * scale)
    with pytest.raises(StoreMismatchError) as info:
        score_matrix(resumed, queries[:3], tmp_path / "o.zarr", progress=False)
    assert info.value.field == "queries_digest"
    with pytest.raises(FileExistsError, match="not a source_proj bulk output"):
        score_matrix(resumed, queries, tmp_path / "s.zarr", progress=False)


def test_score_matrix_memory_is_bounded_by_blocks(tmp_path: Path) -> None:
    n, dim, n_query = 20_000, 32, 200
    features = np.random.default_rng(3).standard_normal((n, dim)).astype(np.float32)
    store = dense_store(tmp_path / "s.zarr", features, chunk_rows=512)
    queries = np.random.default_rng(4).standard_normal((n_query, dim)).astype(np.float32)
    full_matrix = n_query * n * 4
    tracemalloc.start()
    score_matrix(store, queries, tmp_path / "o.zarr", query_block=64, progress=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # One features chunk (64 KiB) + one score block (128 KiB) + zarr's buffers, not 16 MB.
    assert peak < full_matrix / 8, f"peak {peak} bytes"


def test_self_influence_equals_rowwise_dot_and_resumes(tmp_path: Path) -> None:
    features = chunk_features(0, 500, 12)
    store = dense_store(tmp_path / "s.zarr", features, chunk_rows=64)  # 8 chunks
    self_queries = chunk_features(0, 500, 12, seed=7)
    calls: list[int] = []
    crashed: list[bool] = []

    def self_query_chunk(start: int, stop: int) -> np.ndarray:
        if start == 320 and not crashed:
            crashed.append(True)
            raise _Crash("simulated crash")
        calls.append(start)
        return self_queries[start:stop]

    with pytest.raises(_Crash):
        self_influence(store, self_query_chunk, tmp_path / "si.zarr", progress=False)
    values = self_influence(store, self_query_chunk, tmp_path / "si.zarr", progress=False)
    assert calls == list(range(0, 500, 64))  # each chunk computed exactly once
    oracle = np.einsum("ij,ij->i", self_queries.astype(np.float64), features.astype(np.float64))
    np.testing.assert_allclose(values, oracle, rtol=1e-12, atol=0)
    stored = zarr.open_group(tmp_path / "si.zarr", mode="r")["self_influence"][...]
    np.testing.assert_array_equal(stored, values)
    with pytest.raises(ValueError, match=r"returned shape \(64, 3\)"):
        self_influence(store, lambda a, b: np.ones((b - a, 3)), tmp_path / "bad.zarr", progress=False)
