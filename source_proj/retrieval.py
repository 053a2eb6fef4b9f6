"""Exact top-k proponents and opponents by maximum inner product over a feature store.

``score(q, m) = Q[q] . F[m]`` (larger = proponent). Proponents of a query are its k largest
scores; opponents its k most negative ones, found as the k largest scores of ``-Q``. The
search is exact (flat, brute force with faiss's BLAS kernels) and streams the store shard by
shard: each shard of ``shard_rows`` rows is decoded to float32, searched for all queries at
once, and its k best per query are merged into running heaps. Memory is bounded by about two
shards (one searched, one prefetched) whatever N is; a shard as large as the store is the
classic single in-memory flat index.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from source_proj.store import FeatureStore


# Queries multiplied at once in ``exact_proponents_opponents`` (as faiss does in its searches).
_QUERY_BLOCK = 4096


@dataclass(frozen=True)
class TopK:
    """The k best training rows of each query.

    Attributes:
        scores: (n_query, k) float32 scores ``Q[q] . F[ids[q, j]]``, best first (descending
            for proponents, ascending, i.e. most negative first, for opponents).
        ids: (n_query, k) int64 training row indices (0-based rows of the store).
    """

    scores: np.ndarray
    ids: np.ndarray


@dataclass(frozen=True)
class SearchSettings:
    """How an exact search walks the store.

    Attributes:
        shard_rows: rows of F decoded and searched at a time (rounded up to whole store
            chunks); memory is about 2 * shard_rows * D * 4 bytes plus the queries.
        prefetch: read the next shard in a background thread during the search of this one.
        blas_block_rows: rows of a shard that faiss multiplies by the queries in one BLAS call;
            its scratch memory is min(n_query, 4096) x blas_block_rows x 4 bytes. The setting
            is process-wide while a search runs: do not run faiss searches concurrently.
    """

    shard_rows: int = 65536
    prefetch: bool = True
    blas_block_rows: int = 16384

    def __post_init__(self) -> None:
        for name in ("shard_rows", "blas_block_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SearchSettings.{name} must be a positive int, got {value!r}")


@contextmanager
def faiss_blas_block(rows: int) -> Iterator[None]:
    """Let faiss multiply queries by ``rows`` rows of F per BLAS call (process-wide setting,
    restored after). Its default, 1024, costs ~1.5x in time with 1000 queries of D = 1024."""
    before = faiss.cvar.distance_compute_blas_database_bs
    faiss.cvar.distance_compute_blas_database_bs = rows
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_database_bs = before


def check_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    """Validate query features (n_query, dim) and return them as contiguous float32."""
    q = np.asarray(queries)
    if q.ndim != 2 or q.shape[1] != dim or q.shape[0] == 0:
        raise ValueError(f"queries must have shape (n_query >= 1, {dim}), got {q.shape}")
    if not np.issubdtype(q.dtype, np.floating) or not np.all(np.isfinite(q)):
        raise ValueError("queries must be finite floating-point features")
    return np.ascontiguousarray(q, dtype=np.float32)


def check_k(k: int, n_rows: int) -> int:
    """Validate the number of results asked for against the number of training rows."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_rows:
        raise ValueError(f"k must be an int in [1, {n_rows}] (the store's rows), got {k!r}")
    return int(k)


def _shards(store: FeatureStore, settings: SearchSettings, segments: Sequence[int] | None, progress: bool, desc: str):
    """``store.iter_blocks`` over shards, with a progress bar in rows."""
    with tqdm(total=store.layout.n_rows, unit="row", desc=desc, disable=not progress) as bar:
        for start, block in store.iter_blocks(settings.shard_rows, segments, prefetch=settings.prefetch):
            yield start, block
            bar.update(block.shape[0])


def _max_inner_product(
    store: FeatureStore,
    queries: np.ndarray,
    k: int,
    settings: SearchSettings,
    segments: Sequence[int] | None,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (n, k), of the k largest ``queries @ F.T`` per row, sorted."""
    heap = faiss.ResultHeap(queries.shape[0], k, keep_max=True)
    with faiss_blas_block(settings.blas_block_rows):
        for start, block in _shards(store, settings, segments, progress, "top-k search"):
            scores, ids = faiss.knn(queries, block, min(k, block.shape[0]), metric=faiss.METRIC_INNER_PRODUCT)
            heap.add_result(scores, ids + start)
    heap.finalize()
    return heap.D, heap.I


def _max_and_min_inner_product(
    store: FeatureStore,
    queries: np.ndarray,
    k: int,
    settings: SearchSettings,
    segments: Sequence[int] | None,
    progress: bool,
) -> tuple[faiss.ResultHeap, faiss.ResultHeap]:
    """Heaps of the k largest scores and of the k largest negated scores, from one product
    ``queries @ F.T`` per block of (at most 4096 queries) x (blas_block_rows rows)."""
    n = queries.shape[0]
    largest, smallest = (faiss.ResultHeap(n, k, keep_max=True) for _ in range(2))
    q = torch.from_numpy(queries)
    for start, block in _shards(store, settings, segments, progress, "top-k search"):
        for r0 in range(0, block.shape[0], settings.blas_block_rows):
            rows = torch.from_numpy(block[r0 : r0 + settings.blas_block_rows]).T
            for q0 in range(0, n, _QUERY_BLOCK):
                scores = (q[q0 : q0 + _QUERY_BLOCK] @ rows).numpy()
                ids_from = start + r0
                largest.heaps.addn(scores.shape[1], faiss.swig_ptr(scores), ids_from, q0, scores.shape[0])
                np.negative(scores, out=scores)
                smallest.heaps.addn(scores.shape[1], faiss.swig_ptr(scores), ids_from, q0, scores.shape[0])
    largest.finalize()
    smallest.finalize()
    return largest, smallest


def exact_topk(
    store: FeatureStore,
    queries: np.ndarray,
    k: int,
    *,
    opponents: bool = False,
    segments: Sequence[int] | None = None,
    settings: SearchSettings = SearchSettings(),
    progress: bool = True,
) -> TopK:
    """Exact top-k proponents (or, with ``opponents``, opponents) of many queries.

    Args:
        store: a complete feature store.
        queries: query features Q, (n_query, D) (or (n_query, k) with ``segments``).
        k: results per query, 1 <= k <= N.
        opponents: return the k most negative scores instead of the k largest.
        segments: restrict the scores to these segments' per-segment features.
        settings: shard size and prefetching.
        progress: show a progress bar.
    """
    q = check_queries(queries, store.feature_dim(segments))
    k = check_k(k, store.layout.n_rows)
    sign = -1.0 if opponents else 1.0
    scores, ids = _max_inner_product(store, sign * q, k, settings, segments, progress)
    return TopK(sign * scores, ids)


def exact_proponents_opponents(
    store: FeatureStore,
    queries: np.ndarray,
    k: int,
    *,
    segments: Sequence[int] | None = None,
    settings: SearchSettings = SearchSettings(),
    progress: bool = True,
) -> tuple[TopK, TopK]:
    """Exact top-k proponents and opponents in one pass over the store (arguments as in
    ``exact_topk``); returns ``(proponents, opponents)``. Each block of scores is computed
    once (a BLAS product) and fed to two faiss heaps, ~1.5x faster than two searches."""
    q = check_queries(queries, store.feature_dim(segments))
    k = check_k(k, store.layout.n_rows)
    largest, smallest = _max_and_min_inner_product(store, q, k, settings, segments, progress)
    return TopK(largest.D, largest.I), TopK(-smallest.D, smallest.I)
