"""The two ways a query meets the training rows ("query forms"), each an object that owns its
choices: where a query's gradient is taken, how the segments' terms are laid out in the
features, which segments' curvature matters, and how a row's self-influence is formed.

With per-segment training features F_l(m) = w_l M_l g_l(m) (``rows.segment_features``):

* :data:`FINAL` (the paper's form): the query gradient is taken once, at the final checkpoint,
  and carried back through every later segment (M_l = S_L ... S_{l+1} phi_l); the index holds
  F = sum_l F_l, (k,) per row.
* :data:`SEGMENT`: the query gradient is averaged over each segment's own checkpoints and no
  transport is needed (M_l = phi_l); the index holds the segments side by side, (L k,) per row,
  and so does the query.

Code that differs by form asks the form; nothing else branches on its name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from source_proj.errors import InputError
from source_proj.trajectory.checkpoints import Segment


@dataclass(frozen=True)
class QueryForm:
    """A query form (use :data:`FINAL` or :data:`SEGMENT`, or :func:`query_form` by name).

    Attributes:
        name: "final" or "segment" (what ``SourceConfig.query_mode`` and stores record).
        transports: whether the operators carry a segment's effect through the later
            segments (``curvature.transport_operators(..., transport=...)``).
        per_segment: whether queries and features hold one block of k per segment.
    """

    name: str
    transports: bool
    per_segment: bool

    def feature_width(self, k: int, n_segments: int) -> int:
        """D, the length of a query's and a row's feature vector."""
        return n_segments * k if self.per_segment else k

    def combine(self, per_segment: torch.Tensor, segment_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Index-ready features (n, D) from per-segment ones (n, L, k), keeping the segments
        where ``segment_mask`` (L,) is True (all by default)."""
        if segment_mask is not None:
            per_segment = per_segment * segment_mask.to(per_segment.device, per_segment.dtype)[None, :, None]
        if self.per_segment:
            return per_segment.reshape(per_segment.shape[0], -1)
        return per_segment.sum(dim=1)

    def query_checkpoints(self, segments: Sequence[Segment], n_checkpoints: int) -> list[tuple[int, ...]]:
        """The checkpoint groups a query's gradient is averaged over, one block of k each, in
        feature order: the final checkpoint alone, or each segment's checkpoints."""
        if self.per_segment:
            return [tuple(seg.checkpoints) for seg in segments]
        return [(n_checkpoints - 1,)]

    def curvature_segments(self, attributed: Sequence[int], n_segments: int) -> set[int]:
        """The segments whose curvature can change the scores of rows trained in the
        ``attributed`` segments: those alone, or (with transport) also every later one."""
        if self.transports:
            return set(range(min(attributed), n_segments))
        return set(attributed)

    def own_gradients(self, final_gradients: torch.Tensor | None, segment_gradients: torch.Tensor) -> torch.Tensor:
        """Each row's own loss gradients laid out as a query of this form, (n, D): the final
        checkpoint's (n, k), or the per-segment means (n, L, k) side by side. Self-influence is
        the inner product of these with the row's features (minus the row's score on its own
        loss, the sign of the query features cancelling)."""
        if self.per_segment:
            return segment_gradients.reshape(segment_gradients.shape[0], -1)
        if final_gradients is None:
            raise ValueError("the final form needs the gradients at the final checkpoint")
        return final_gradients

    def restrict_queries(
        self, queries: np.ndarray, chosen: Sequence[int], n_segments: int, stored_segments: bool
    ) -> tuple[np.ndarray, list[int] | None]:
        """Queries and stored segments for scores restricted to the segments ``chosen``: in the
        per-segment form the other segments' blocks of the queries are zeroed (no segment
        selection needed); in the final form the features must be read per segment, which
        needs a store that keeps them (``stored_segments``)."""
        if self.per_segment:
            mask = np.zeros((1, n_segments, 1), dtype=queries.dtype)
            mask[0, list(chosen)] = 1
            return (queries.reshape(len(queries), n_segments, -1) * mask).reshape(queries.shape), None
        if not stored_segments:
            raise InputError(
                "the store keeps no per-segment features: fit it with per-segment features kept "
                "(keep_segment_features / --keep-segments) for per-stage scores"
            )
        return queries, list(chosen)


FINAL = QueryForm("final", transports=True, per_segment=False)
SEGMENT = QueryForm("segment", transports=False, per_segment=True)
QUERY_FORMS = {form.name: form for form in (FINAL, SEGMENT)}


def query_form(name: str) -> QueryForm:
    """The query form called ``name`` ("final" or "segment")."""
    if name not in QUERY_FORMS:
        raise InputError(f"unknown query form {name!r}; expected one of {sorted(QUERY_FORMS)}")
    return QUERY_FORMS[name]
