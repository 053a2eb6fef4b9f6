"""Where the training features live, behind one interface: :class:`FeatureSource`.

Searches and sums over training rows (``retrieval.exact``, ``retrieval.group``) read features
block by block through this interface, so they work the same over a zarr feature store
(``store.FeatureStore``, the persistent, resumable, checked backend) and over features held in
memory (:class:`MemoryFeatures`, what ``SourceAttributor.fit`` computes without a store). A new
backend implements these few methods.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from source_proj.errors import InputError


@runtime_checkable
class FeatureSource(Protocol):
    """N training rows of index-ready features F (N, D), optionally per segment (N, L, k)."""

    @property
    def n_rows(self) -> int:
        """N, the number of training rows."""
        ...

    @property
    def n_segments(self) -> int:
        """L when the per-segment features are kept (for per-stage scores), else 0."""
        ...

    def feature_dim(self, segments: Sequence[int] | None = None) -> int:
        """D, or k when reading the sum of the per-segment features of ``segments``."""
        ...

    def iter_blocks(
        self,
        block_rows: int,
        segments: Sequence[int] | None = None,
        *,
        prefetch: bool = True,
        reuse_buffers: bool = False,
        select: Callable[[list[int]], list[int]] | None = None,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, rows)`` float32 (n, D) (or (n, k) with ``segments``) over all rows in
        blocks of about ``block_rows``; ``select`` picks which block starts to yield (a rank's
        share). With ``reuse_buffers`` a block is valid only until the next one."""
        ...

    def self_influence(self) -> np.ndarray:
        """(N,) float64 self-influence of every row."""
        ...

    def require_complete(self) -> None:
        """Raise if the features are not all there yet (a store still being written)."""
        ...


@dataclass(frozen=True)
class MemoryFeatures:
    """A :class:`FeatureSource` over tensors in memory.

    Attributes:
        features: F, (N, D) float32.
        segment_features: (N, L, k) float32 per-segment features, or None.
        self_influences: (N,) float64, or None if not computed.
    """

    features: torch.Tensor
    segment_features: torch.Tensor | None = None
    self_influences: torch.Tensor | None = None

    @classmethod
    def of(cls, features: FeatureSource | np.ndarray | torch.Tensor) -> FeatureSource:
        """``features`` as a source: a source as it is, an (N, D) array wrapped."""
        if isinstance(features, FeatureSource):
            return features
        if isinstance(features, (np.ndarray, torch.Tensor)) and features.ndim == 2:
            return cls(torch.as_tensor(features))
        raise InputError(f"features must be a feature store or an (N, D) array, got {type(features).__name__}")

    @property
    def n_rows(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_segments(self) -> int:
        return 0 if self.segment_features is None else int(self.segment_features.shape[1])

    def feature_dim(self, segments: Sequence[int] | None = None) -> int:
        if segments is None:
            return int(self.features.shape[1])
        return int(self._segments(segments).shape[-1])

    def _segments(self, segments: Sequence[int]) -> torch.Tensor:
        if self.segment_features is None:
            raise InputError("segments select per-segment features; these in-memory features have none "
                             "(fit with keep_segment_features=True)")
        count = self.segment_features.shape[1]
        bad = [s for s in segments if not 0 <= s < count]
        if bad or not segments:
            raise InputError(f"segments must be a non-empty list of indices in [0, {count}), got {list(segments)}")
        return self.segment_features

    def iter_blocks(
        self,
        block_rows: int,
        segments: Sequence[int] | None = None,
        *,
        prefetch: bool = True,
        reuse_buffers: bool = False,
        select: Callable[[list[int]], list[int]] | None = None,
    ) -> Iterator[tuple[int, np.ndarray]]:
        source = self.features if segments is None else self._segments(segments)[:, list(segments)].sum(dim=1)
        starts = list(range(0, self.n_rows, max(1, block_rows)))
        for start in starts if select is None else select(starts):
            block = source[start : start + block_rows].detach().cpu()
            yield start, np.ascontiguousarray(block.numpy(), dtype=np.float32)

    def self_influence(self) -> np.ndarray:
        if self.self_influences is None:
            raise InputError("these features carry no self-influence")
        return self.self_influences.detach().cpu().numpy().astype(np.float64)

    def require_complete(self) -> None:
        return None
