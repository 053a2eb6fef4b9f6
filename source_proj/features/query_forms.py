"""The ways a query meets the training rows ("query forms"), each an object that owns its
choices: where a query's gradient is taken, how the segments' terms are laid out in the
features, which segments' curvature matters, and how a row's self-influence is formed.

With per-segment training features F_l(m) = w_l M_l g_l(m) (``rows.segment_features``), every
segment's term is either *own* or *carried*:

* own: the query gradient is averaged over the segment's own checkpoints, no transport is
  needed (M_l = phi_l), and the term has a block of k of its own in the features and queries;
* carried (the paper's form): the query gradient is taken once, at the final checkpoint, and
  the term is carried through every later segment (M_l = S_L ... S_{l+1} phi_l); all carried
  terms share one block of k, their sum, scored against that one final query gradient.

The forms differ in which segments are own:

* ``"final"``: none; the index holds F = sum_l F_l, (k,) per row.
* ``"segment"``: all; the index holds the segments side by side, (L k,) per row.
* ``"staged"``: the segments of the last training stage are own, the earlier stages' are
  carried: (L_last + 1) k per row, and L k (the ``"segment"`` form itself) for a run of one
  stage. Within the last stage nothing lies between a row's step and the final model but that
  stage's own training, as in a one-stage run, where the per-segment form is the more
  accurate; an earlier stage's effect must still cross the later stages' training, which only
  the carried form models (a query gradient taken during the earlier stage cannot see what the
  later ones undo).

Code that differs by form asks the form (bound to a run's segments by :func:`query_form`);
nothing else branches on its name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from source_proj.errors import InputError
from source_proj.trajectory.checkpoints import Segment


@dataclass(frozen=True)
class QueryForm:
    """A query form bound to a run's segments (make one with :func:`query_form`).

    Attributes:
        name: "final", "segment" or "staged" (what ``SourceConfig.query_mode`` and stores
            record).
        own: per segment, whether its term has a block of its own (its query gradient taken
            at its own checkpoints, no transport) rather than being carried to the final one.
    """

    name: str
    own: tuple[bool, ...]

    @property
    def carries(self) -> bool:
        """Whether some segment's term is carried to the final checkpoint (then the features
        end with one block for all carried terms, queried with the final gradient)."""
        return not all(self.own)

    @property
    def per_segment(self) -> bool:
        """Whether every segment has a block of its own (the features hold the segments side
        by side, so per-segment scores need no stored per-segment features)."""
        return all(self.own)

    @property
    def carried(self) -> tuple[bool, ...]:
        """Per segment, whether its operator carries it through the later segments
        (``curvature.transport_operators``)."""
        return tuple(not own for own in self.own)

    def _blocks(self) -> int:
        return sum(self.own) + int(self.carries)

    def feature_width(self, k: int) -> int:
        """D, the length of a query's and a row's feature vector."""
        return self._blocks() * k

    def combine(self, per_segment: torch.Tensor, segment_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Index-ready features (n, D) from per-segment ones (n, L, k), keeping the segments
        where ``segment_mask`` (L,) is True (all by default): the own segments' blocks in
        order, then the sum of the carried ones."""
        if segment_mask is not None:
            per_segment = per_segment * segment_mask.to(per_segment.device, per_segment.dtype)[None, :, None]
        own = torch.tensor(self.own, device=per_segment.device)
        blocks = [per_segment[:, own].reshape(per_segment.shape[0], -1)]
        if self.carries:
            blocks.append(per_segment[:, ~own].sum(dim=1))
        return torch.cat(blocks, dim=1)

    def query_checkpoints(self, segments: Sequence[Segment], n_checkpoints: int) -> list[tuple[int, ...]]:
        """The checkpoint groups a query's gradient is averaged over, one block of k each, in
        feature order: each own segment's checkpoints, then the final checkpoint alone."""
        groups = [tuple(seg.checkpoints) for seg, own in zip(segments, self.own) if own]
        return groups + [(n_checkpoints - 1,)] if self.carries else groups

    def curvature_segments(self, attributed: Sequence[int]) -> set[int]:
        """The segments whose curvature can change the scores of rows trained in the
        ``attributed`` segments: each own one itself; each carried one and every later one."""
        needed = {l for l in attributed if self.own[l]}
        carried = [l for l in attributed if not self.own[l]]
        if carried:
            needed |= set(range(min(carried), len(self.own)))
        return needed

    def own_gradients(self, final_gradients: torch.Tensor | None, segment_gradients: torch.Tensor) -> torch.Tensor:
        """Each row's own loss gradients laid out as a query of this form, (n, D): the own
        segments' means (n, L, k) side by side, then the final checkpoint's (n, k).
        Self-influence is the inner product of these with the row's features (minus the row's
        score on its own loss, the sign of the query features cancelling)."""
        own = torch.tensor(self.own)
        blocks = [segment_gradients[:, own].reshape(segment_gradients.shape[0], -1)]
        if self.carries:
            if final_gradients is None:
                raise ValueError("a carried term needs the gradients at the final checkpoint")
            blocks.append(final_gradients)
        return torch.cat(blocks, dim=1)

    def restrict_queries(
        self, queries: np.ndarray, chosen: Sequence[int], stored_segments: bool
    ) -> tuple[np.ndarray, list[int] | None]:
        """Queries and stored segments for scores restricted to the segments ``chosen``: the
        blocks of the own segments not chosen are zeroed in the queries, and so is the
        carried block when no carried segment is chosen, or kept whole when all are. Only a
        choice of some carried segments and not others needs the features read per segment,
        from features that keep them (``stored_segments``), summed over the choice: then only
        the final query's block is returned, with the chosen segments."""
        chosen_set = set(chosen)
        carried = {l for l, carry in enumerate(self.carried) if carry}
        kept = carried & chosen_set
        width = queries.shape[1] // self._blocks()
        if kept and kept != carried:
            if kept != chosen_set:
                raise InputError("a choice of segments that splits the carried ones cannot also take own segments")
            if not stored_segments:
                raise InputError(
                    "no per-segment features are kept: fit with keep_segment_features=True (--keep-segments) "
                    "for scores of some of the stages before the last"
                )
            return np.ascontiguousarray(queries[:, -width:]), list(chosen)  # the final query's block
        mask = [l in chosen_set for l, own in enumerate(self.own) if own]
        if self.carries:
            mask.append(bool(kept))
        block_mask = np.repeat(np.asarray(mask, dtype=queries.dtype), width)
        return queries * block_mask[None, :], None


def _no_segment(segments: Sequence[Segment]) -> tuple[bool, ...]:
    return tuple(False for _ in segments)


def _every_segment(segments: Sequence[Segment]) -> tuple[bool, ...]:
    return tuple(True for _ in segments)


def _last_stage(segments: Sequence[Segment]) -> tuple[bool, ...]:
    last = segments[-1].stage
    return tuple(seg.stage == last for seg in segments)


# Which segments each form gives a block of their own.
QUERY_FORMS: dict[str, Callable[[Sequence[Segment]], tuple[bool, ...]]] = {
    "final": _no_segment,
    "segment": _every_segment,
    "staged": _last_stage,
}


def query_form(name: str, segments: Sequence[Segment]) -> QueryForm:
    """The query form called ``name`` ("final", "segment" or "staged") for a run divided into
    ``segments``."""
    if name not in QUERY_FORMS:
        raise InputError(f"unknown query form {name!r}; expected one of {sorted(QUERY_FORMS)}")
    if not segments:
        raise InputError("a query form needs at least one segment")
    return QueryForm(name, QUERY_FORMS[name](segments))
