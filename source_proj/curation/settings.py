"""Settings of a curation run (a frozen dataclass)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from source_proj.errors import InputError

RANKINGS = ("auto", "self_influence", "heldout_loss", "harm", "combined")


def _check_fraction(name: str, value: float, low_open: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (0 < value <= 1 if low_open else 0 <= value <= 1):
        bounds = "(0, 1]" if low_open else "[0, 1]"
        raise InputError(f"CurationConfig.{name} must be a number in {bounds}, got {value!r}")


@dataclass(frozen=True)
class CurationConfig:
    """How training rows are ranked, flagged and weighted.

    Attributes:
        rank_by: the suspicion score rows are ranked by (larger = more suspicious):
            - "self_influence": SOURCE self-influence, the predicted rise of the row's own
              loss if it were left out of training (memorisation).
            - "heldout_loss": the row's loss at the final model plus its self-influence: the
              loss SOURCE predicts the row would have had it never been trained on (a
              leave-one-out loss). Needs the final losses. The best mislabel detector
              measured (``benchmarks/results/curation-detection.md``): as good as the loss when the
              model has not fitted the wrong labels yet, and far better once it has.
            - "harm": harm to a query set, the predicted rise of the set's summed loss when
              the row is included (group influence on the set's loss).
            - "combined": the mean of the percentile ranks of "heldout_loss" (or
              "self_influence" without losses) and of "harm", with weight ``harm_weight``
              on "harm".
            - "auto" (default): "combined" when both a row signal and harm are given,
              otherwise "harm", "heldout_loss" or "self_influence", whichever is given
              (in that order of preference).
        flag_fraction: the fraction of rows flagged (the highest scores); flagged rows are
            dropped by the keep-mask and down-weighted by the weights.
        harm_weight: weight of "harm" in "combined" (the row signal gets 1 - harm_weight).
        weight_floor: the smallest weight a flagged row gets (0: may be dropped entirely).
        weight_width: how fast weights fall above the flag threshold, in robust spreads of
            the score (1.4826 x median absolute deviation): a row ``weight_width`` spreads
            above the threshold gets ``weight_floor``.
    """

    rank_by: str = "auto"
    flag_fraction: float = 0.05
    harm_weight: float = 0.5
    weight_floor: float = 0.0
    weight_width: float = 1.0

    def __post_init__(self) -> None:
        if self.rank_by not in RANKINGS:
            raise InputError(f"CurationConfig.rank_by must be one of {RANKINGS}, got {self.rank_by!r}")
        _check_fraction("flag_fraction", self.flag_fraction)
        _check_fraction("harm_weight", self.harm_weight, low_open=False)
        _check_fraction("weight_floor", self.weight_floor, low_open=False)
        width = self.weight_width
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not (math.isfinite(width) and width > 0):
            raise InputError(f"CurationConfig.weight_width must be finite and > 0, got {width!r}")
