"""Exact top-k proponents and opponents by maximum inner product over a feature store.

``score(q, m) = Q[q] . F[m]`` (larger = proponent). Proponents of a query are its k largest
scores; opponents its k most negative ones (the k largest of ``-Q . F[m]``). The search is
exact (flat, brute force) and streams the store shard by shard: each shard of ``shard_rows``
rows is decoded to float32 and multiplied by all queries in blocks (one BLAS product each,
through torch), and every block of scores is fed to faiss's per-query top-k heaps (C++
selection, cheaper than sorting). Proponents and opponents share the products. Memory is
bounded by about two shards (one searched, one prefetched) plus one block of scores,
whatever N is; a shard as large as the store is the classic single in-memory flat index.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from source_proj.store import FeatureStore

# Queries multiplied at once (as faiss does in its own searches).
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
        block_rows: rows of a shard multiplied by the queries at once; the scores of one
            product take min(n_query, 4096) x block_rows x 4 bytes.
    """

    shard_rows: int = 65536
    prefetch: bool = True
    block_rows: int = 16384

    def __post_init__(self) -> None:
        for name in ("shard_rows", "block_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SearchSettings.{name} must be a positive int, got {value!r}")


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


def _score_blocks(
    store: FeatureStore,
    queries: np.ndarray,
    settings: SearchSettings,
    segments: Sequence[int] | None,
    progress: bool,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(first query, first row, scores)`` for every block of ``queries @ F.T``:
    at most 4096 queries x ``block_rows`` rows, float32, C-contiguous."""
    q = torch.from_numpy(queries)
    blocks = store.iter_blocks(settings.shard_rows, segments, prefetch=settings.prefetch)
    with tqdm(total=store.layout.n_rows, unit="row", desc="top-k search", disable=not progress) as bar:
        for start, shard in blocks:
            for r0 in range(0, shard.shape[0], settings.block_rows):
                rows_t = torch.from_numpy(shard[r0 : r0 + settings.block_rows]).T
                for q0 in range(0, q.shape[0], _QUERY_BLOCK):
                    yield q0, start + r0, (q[q0 : q0 + _QUERY_BLOCK] @ rows_t).numpy()
            bar.update(shard.shape[0])


def _search(
    store: FeatureStore,
    queries: np.ndarray,
    k: int,
    signs: tuple[float, ...],
    settings: SearchSettings,
    segments: Sequence[int] | None,
    progress: bool,
) -> list[TopK]:
    """For each sign s, the k largest ``s * (queries @ F.T)`` per query, as a ``TopK`` of the
    unsigned scores; one pass over the store, one product per block for all signs."""
    heaps = [faiss.ResultHeap(queries.shape[0], k, keep_max=True) for _ in signs]
    for q0, row0, scores in _score_blocks(store, queries, settings, segments, progress):
        current = 1.0
        for sign, heap in zip(signs, heaps):
            if sign != current:
                np.negative(scores, out=scores)
                current = sign
            heap.heaps.addn(scores.shape[1], faiss.swig_ptr(scores), row0, q0, scores.shape[0])
    for heap in heaps:
        heap.finalize()
    return [TopK(sign * heap.D, heap.I) for sign, heap in zip(signs, heaps)]


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
        settings: shard and block sizes, prefetching.
        progress: show a progress bar.
    """
    q = check_queries(queries, store.feature_dim(segments))
    k = check_k(k, store.layout.n_rows)
    return _search(store, q, k, (-1.0 if opponents else 1.0,), settings, segments, progress)[0]


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
    ``exact_topk``), each block of scores computed once; returns ``(proponents, opponents)``."""
    q = check_queries(queries, store.feature_dim(segments))
    k = check_k(k, store.layout.n_rows)
    proponents, opponents = _search(store, q, k, (1.0, -1.0), settings, segments, progress)
    return proponents, opponents
