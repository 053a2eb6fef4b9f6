"""Synthetic features and small stores shared by the store, retrieval and bulk tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from source_proj.features.featurize import featurize
from source_proj.features.layout import ChunkFeatures, StoreLayout
from source_proj.features.store import FeatureStore

METADATA = {
    "projection": {"dim": 16, "seed": 3, "kind": "rademacher"},
    "model_fingerprint": "a1b2c3",
    "trajectory": {"checkpoints": 4, "lrs": [0.1, 0.1, 0.05, 0.05], "steps": [10, 10, 10, 10]},
    "segments": [{"stage": "0", "checkpoints": [0, 1]}, {"stage": "0", "checkpoints": [2, 3]}],
}


def chunk_features(start: int, stop: int, dim: int, seed: int = 0) -> np.ndarray:
    """Deterministic features of rows [start, stop): every row depends only on (seed, row),
    rows have norms spread over several orders of magnitude, float32 (n, dim)."""
    rows = []
    for m in range(start, stop):
        rng = np.random.default_rng([seed, m])
        rows.append(rng.standard_normal(dim) * np.exp(2.0 * rng.standard_normal()))
    return np.asarray(rows, dtype=np.float32).reshape(stop - start, dim)


def dense_store(path: Path, features: np.ndarray, *, dtype: str = "float32", chunk_rows: int = 64,
                segment_features: np.ndarray | None = None, metadata: dict | None = None) -> FeatureStore:
    """A complete store at ``path`` holding the given (N, D) features (and (N, L, k))."""
    n, dim = features.shape
    seg_shape = segment_features.shape[1:] if segment_features is not None else (0, 0)
    layout = StoreLayout(n, dim, dtype, chunk_rows, *seg_shape)
    store = FeatureStore.create(path, layout, METADATA if metadata is None else metadata)
    if segment_features is None:
        featurize(store, lambda a, b: features[a:b], progress=False)
    else:
        featurize(store, lambda a, b: ChunkFeatures(features[a:b], segment_features[a:b]), progress=False)
    return store


def chunk_with_extras(start: int, stop: int, dim: int, n_segments: int, segment_dim: int) -> ChunkFeatures:
    """Deterministic ChunkFeatures of rows [start, stop): features, per-segment features and
    a self-influence column, each a function of the row index only."""
    features = chunk_features(start, stop, dim)
    segments = chunk_features(start, stop, n_segments * segment_dim, seed=1)
    self_inf = chunk_features(start, stop, 1, seed=2)[:, 0].astype(np.float64)
    return ChunkFeatures(features, segments.reshape(stop - start, n_segments, segment_dim), self_inf)
