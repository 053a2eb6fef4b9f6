"""Ranking, flagging and weighting training rows from per-row signals (pure functions).

Signals, each (N,) float, larger = more suspicious:

- ``self_influence``: SOURCE's predicted rise of a row's own loss if it were left out.
- ``losses``: the row's training loss at the final checkpoint (not an attribution signal;
  combined with self-influence into the held-out loss).
- ``heldout_loss = losses + self_influence``: the loss SOURCE predicts the row would have had
  it never been trained on. A wrong label shows as a high loss while the model has not
  fitted it, and as a high self-influence (a low loss bought by memorising the row) once it
  has; the sum catches both.
- ``harm``: group influence on a query set's loss (``source_proj.retrieval.group``): the
  predicted rise of the set's summed loss when the row is included.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from source_proj.curation.settings import CurationConfig
from source_proj.curation.table import CurationTable
from source_proj.errors import InputError

# Robust spread of a normal sample from its median absolute deviation.
_MAD_TO_STD = 1.4826


def _signal(name: str, values: object, n: int | None) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.shape[0] == 0 or (n is not None and array.shape[0] != n):
        want = "(N,)" if n is None else f"({n},)"
        raise InputError(f"{name} must be a non-empty 1-D array of shape {want}, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        bad = np.flatnonzero(~np.isfinite(array))
        raise InputError(f"{name} has non-finite values at rows {bad[:10].tolist()}")
    return array


def percentile_ranks(values: np.ndarray) -> np.ndarray:
    """(N,) float64 in (0, 1]: each value's rank over N (ties share their average rank)."""
    return rankdata(values) / len(values)


def resolve_ranking(rank_by: str, has_self: bool, has_loss: bool, has_harm: bool) -> str:
    """The ranking ``rank_by`` names given which signals exist ("auto" resolved); raises
    ``ValueError`` naming a missing signal."""
    # Losses alone are no row signal: "combined" ranks heldout_loss or self_influence, both
    # of which need self-influence.
    has_row = has_self
    if rank_by == "auto":
        if has_row and has_harm:
            return "combined"
        if has_harm:
            return "harm"
        if has_self and has_loss:
            return "heldout_loss"
        if has_self:
            return "self_influence"
        raise InputError("no signal to rank by: give self_influence (and losses) and/or harm")
    needs = {
        "self_influence": {"self_influence": has_self},
        "heldout_loss": {"self_influence": has_self, "losses": has_loss},
        "harm": {"harm": has_harm},
        "combined": {"self_influence": has_self, "harm": has_harm},
    }[rank_by]
    missing = [name for name, present in needs.items() if not present]
    if missing:
        raise InputError(f"rank_by={rank_by!r} needs {missing}")
    return rank_by


def suspicion_scores(
    config: CurationConfig,
    *,
    self_influence: np.ndarray | None = None,
    losses: np.ndarray | None = None,
    harm: np.ndarray | None = None,
) -> tuple[np.ndarray, str, dict[str, np.ndarray]]:
    """The score (N,) float64 to rank by, the resolved ranking name, and the signal columns
    (name -> (N,)) it was computed from (see the module docstring and ``CurationConfig``)."""
    signals: dict[str, np.ndarray] = {}
    n = None
    for name, argument, values in (("self_influence", "self_influence", self_influence), ("loss", "losses", losses),
                                   ("harm", "harm", harm)):
        if values is not None:
            signals[name] = _signal(argument, values, n)
            n = signals[name].shape[0]
    ranking = resolve_ranking(config.rank_by, "self_influence" in signals, "loss" in signals, "harm" in signals)
    if "self_influence" in signals and "loss" in signals:
        signals["heldout_loss"] = signals["loss"] + signals["self_influence"]
    if ranking == "combined":
        # resolve_ranking gives "combined" only with self-influence, so a row signal exists
        row_signal = signals.get("heldout_loss", signals["self_influence"])
        w = config.harm_weight
        score = (1 - w) * percentile_ranks(row_signal) + w * percentile_ranks(signals["harm"])
    else:
        score = signals[ranking]
    return score, ranking, signals


def ranks(scores: np.ndarray) -> np.ndarray:
    """(N,) int64 ranks, 1 for the largest score; ties go to the lower row id."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    out = np.empty(len(order), dtype=np.int64)
    out[order] = np.arange(1, len(order) + 1)
    return out


def flag_count(n_rows: int, fraction: float) -> int:
    """Rows flagged out of ``n_rows`` for ``fraction``: round(fraction * N), at least 1."""
    return max(1, min(n_rows, int(round(fraction * n_rows))))


def row_weights(scores: np.ndarray, flags: np.ndarray, floor: float, width: float) -> np.ndarray:
    """Per-row weights (N,) float64: 1 for unflagged rows, below 1 for flagged ones (unless
    ``floor`` is 1).

    A flagged row gets ``clip(1 - (s - s0) / (width * spread), floor, 1)``, with s0 the flag
    threshold, the largest score below every flagged score, and spread the robust spread of
    all scores (1.4826 x MAD, else the standard deviation, else 1). Where no score lies below
    the flagged ones (a single row, every row flagged, or flagged rows tied with every
    unflagged one) there is nothing to ramp from, and flagged rows get ``floor``, like the
    keep-mask that drops them. ``flags`` must mark the highest scores (as ``curate`` does).
    """
    s = np.asarray(scores, dtype=np.float64)
    flags = np.asarray(flags, dtype=bool)
    if not flags.any():
        return np.ones_like(s)
    # An unflagged row tied with a flagged one is no threshold: the flagged row would get 1.
    below = s[s < s[flags].min()]
    if below.size == 0:
        return np.where(flags, floor, 1.0)
    spread = _MAD_TO_STD * float(np.median(np.abs(s - np.median(s))))
    if not spread > 0:
        spread = float(s.std()) if s.std() > 0 else 1.0
    # Capped below 1: a score within round-off of the threshold still marks its row flagged.
    ramp = np.clip(1.0 - (s - below.max()) / (width * spread), floor, max(floor, np.nextafter(1.0, 0.0)))
    return np.where(flags, ramp, 1.0)


def curate(
    *,
    self_influence: np.ndarray | None = None,
    losses: np.ndarray | None = None,
    harm: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    config: CurationConfig = CurationConfig(),
) -> CurationTable:
    """Rank, flag and weight the N training rows from the signals given.

    Args:
        self_influence: (N,) SOURCE self-influence (``FeatureStore.self_influence()`` or
            ``SourceAttributor.self_influence()``).
        losses: (N,) training losses at the final checkpoint (``final_losses``).
        harm: (N,) predicted rise of a query set's summed loss when the row is included
            (``query_set_harm``); with a margin-type measurement, pass minus the group
            influence.
        labels: (N,) training labels, copied into the table.
        config: ranking, flagged fraction and weighting.

    Returns:
        A :class:`CurationTable` in row order; ``keep_mask()`` and ``weights()`` feed a
        ``Subset`` / ``WeightedRandomSampler`` or a loss weight.
    """
    score, ranking, signals = suspicion_scores(config, self_influence=self_influence, losses=losses, harm=harm)
    n = score.shape[0]
    rank = ranks(score)
    flags = rank <= flag_count(n, config.flag_fraction)
    columns: dict[str, np.ndarray] = {"row_id": np.arange(n, dtype=np.int64)}
    if labels is not None:
        label_array = np.asarray(labels)
        if label_array.shape != (n,):
            raise InputError(f"labels must have shape ({n},), got {label_array.shape}")
        columns["label"] = label_array
    columns.update(
        score=score, rank=rank, flag=flags,
        weight=row_weights(score, flags, config.weight_floor, config.weight_width), **signals,
    )
    return CurationTable(columns, ranking)
