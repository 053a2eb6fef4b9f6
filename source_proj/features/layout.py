"""What a feature store holds, and what a featurisation step hands it: ``StoreLayout`` (rows,
width, encoding, chunking, optional per-segment features and self-influence) and
``ChunkFeatures``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from source_proj.errors import InputError
from source_proj.features.codec import STORE_DTYPES


@dataclass(frozen=True)
class StoreLayout:
    """Shapes and encoding of a store.

    Attributes:
        n_rows: N, the number of training examples (rows of F).
        dim: D, the length of a feature row (k, or L * k in a segment-wise mode).
        dtype: "float32" or "float16" (scaled per row, see the module docstring).
        chunk_rows: rows per zarr chunk: the unit of writing, resuming and memory use.
        n_segments: L for optional per-segment features (N, L, k); 0 stores none.
        segment_dim: k of the per-segment features; 0 when n_segments is 0.
        self_influence: keep a per-row self-influence column (N,) float64.
    """

    n_rows: int
    dim: int
    dtype: str = "float32"
    chunk_rows: int = 4096
    n_segments: int = 0
    segment_dim: int = 0
    self_influence: bool = False

    def __post_init__(self) -> None:
        for name in ("n_rows", "dim", "chunk_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"StoreLayout.{name} must be a positive int, got {value!r}")
        for name in ("n_segments", "segment_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputError(f"StoreLayout.{name} must be an int >= 0, got {value!r}")
        if (self.n_segments == 0) != (self.segment_dim == 0):
            raise InputError(
                "StoreLayout.n_segments and segment_dim must both be 0 (no per-segment "
                f"features) or both positive, got {self.n_segments} and {self.segment_dim}"
            )
        if self.dtype not in STORE_DTYPES:
            raise InputError(f"StoreLayout.dtype must be one of {STORE_DTYPES}, got {self.dtype!r}")

    @property
    def n_chunks(self) -> int:
        return -(-self.n_rows // self.chunk_rows)

    def parts(self) -> tuple[str, ...]:
        """The row-chunked arrays of a store with this layout (the ledger's parts)."""
        f16 = self.dtype == "float16"
        names = ["features", *(["row_scale"] if f16 else [])]
        if self.n_segments:
            names += ["segment_features", *(["segment_scale"] if f16 else [])]
        if self.self_influence:
            names.append("self_influence")
        return tuple(names)

    def chunk_range(self, index: int) -> tuple[int, int]:
        """Rows [start, stop) of chunk ``index``."""
        start = index * self.chunk_rows
        return start, min(start + self.chunk_rows, self.n_rows)


@dataclass(frozen=True)
class ChunkFeatures:
    """What ``compute_chunk(start, stop)`` returns for n = stop - start training rows when
    the store keeps more than F (a plain (n, D) array is enough otherwise).

    Attributes:
        features: F rows, (n, D) float.
        segment_features: per-segment F_l rows, (n, L, k) float; required iff the store's
            layout has ``n_segments > 0``.
        self_influence: (n,) float; required iff the layout has ``self_influence``.
    """

    features: np.ndarray
    segment_features: np.ndarray | None = None
    self_influence: np.ndarray | None = None


ComputeChunk = Callable[[int, int], "np.ndarray | ChunkFeatures"]
