"""Group influence: the summed score of every training row over a whole set of queries.

Scores are linear in the query features, ``score(q, m) = Q[q] . F[m]``, so the total effect of
row m on a set of queries (a validation set, a slice, one failure) is

    group[m] = sum_q w_q score(q, m) = (sum_q w_q Q[q]) . F[m],

one inner product per row with the (weighted) sum of the query features. ``group_influence``
forms that sum once (float64, from query blocks of any number and size) and walks the store
(or in-memory features) block by block: memory is one query-sum vector plus about two blocks of rows (one read
ahead), never the (n_query, N) score matrix. The sign convention is the scores': ``group[m] >
0`` means including row m raises the summed measurement (for a classification margin: row m
helps the set; for a loss or an error: it hurts it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from source_proj.errors import InputError
from source_proj.features.source import FeatureSource, MemoryFeatures
from source_proj.retrieval.exact import check_queries


def query_sum(
    queries: np.ndarray | torch.Tensor | Iterable[np.ndarray | torch.Tensor],
    dim: int,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """The weighted sum ``sum_q w_q Q[q]`` of query features, float64 (dim,).

    Args:
        queries: query features (n_query, dim), or an iterable of such blocks (e.g. computed
            chunk by chunk for a query set too large to hold), summed as they come.
        dim: D, the feature length of the store the sum will be scored against.
        weights: optional (n_query,) finite per-query weights (only with an array of
            queries); default 1 for every query (the plain group effect). ``1 / n_query``
            gives the mean effect.
    """
    if isinstance(queries, (np.ndarray, torch.Tensor)):
        blocks: Iterable = [queries]
    else:
        if weights is not None:
            raise InputError("weights need the queries as one (n_query, D) array, not an iterable of blocks")
        blocks = queries
    total = np.zeros(dim, dtype=np.float64)
    seen = 0
    for block in blocks:
        q = check_queries(block.numpy() if isinstance(block, torch.Tensor) else block, dim).astype(np.float64)
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != (q.shape[0],) or not np.all(np.isfinite(w)):
                raise InputError(f"weights must be finite with shape ({q.shape[0]},), got {w.shape}")
            q = q * w[:, None]
        total += q.sum(axis=0)
        seen += q.shape[0]
    if seen == 0:
        raise InputError("the query set is empty")
    return total


def group_influence(
    features: FeatureSource | np.ndarray | torch.Tensor,
    queries: np.ndarray | torch.Tensor | Iterable[np.ndarray | torch.Tensor],
    *,
    weights: np.ndarray | None = None,
    segments: Sequence[int] | None = None,
    block_rows: int = 16384,
    progress: bool = True,
) -> np.ndarray:
    """Group influence of every training row on a set of queries, (N,) float64.

    ``group[m] = sum_q w_q Q[q] . F[m]``: the row sums of the score matrix, computed without
    it (see the module docstring). Each row's value is one float32 inner product of length D
    with the float64 query sum rounded to float32, so it is within about
    ``D * 2^-24 |sum_q w_q Q[q]| |F[m]|`` of the exact value (plus the store's own float16
    encoding error, 2^-11 relative, for a float16 store).

    Args:
        features: the training features (N rows): a complete feature store, any
            ``FeatureSource``, or F (N, D) in memory (e.g. ``SourceAttributor.train_features``).
        queries: query features Q (n_query, D) (or (n_query, k) with ``segments``), or an
            iterable of such blocks (for a query set of any size).
        weights: optional (n_query,) weights of the queries (see :func:`query_sum`).
        segments: restrict the scores to these segments' per-segment features.
        block_rows: store rows decoded and multiplied at once (rounded up to whole chunks);
            memory is about 2 * block_rows * D * 4 bytes.
        progress: show a progress bar.

    Returns:
        float64 (N,): > 0 means including the row raises the set's summed measurement.
    """
    if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1:
        raise InputError(f"block_rows must be a positive int, got {block_rows!r}")
    source = MemoryFeatures.of(features)
    source.require_complete()
    n_rows, dim = source.n_rows, source.feature_dim(segments)
    total = torch.from_numpy(query_sum(queries, dim, weights).astype(np.float32))
    out = np.empty(n_rows, dtype=np.float64)
    with tqdm(total=n_rows, unit="row", desc="group influence", disable=not progress) as bar:
        for start, rows in source.iter_blocks(block_rows, segments, reuse_buffers=True):
            out[start : start + rows.shape[0]] = (torch.from_numpy(rows) @ total).numpy()
            bar.update(rows.shape[0])
    return out
