"""The linear datamodeling score (LDS) of an attribution score matrix.

Scores follow the library's sign convention: ``scores[q, m] > 0`` means that including
training row m raises query q's measurement. The predicted effect of training on subset S is
therefore the sum of the scores over S, and the LDS of query q is the Spearman correlation,
across the M subsets of the ground truth, between that prediction and the mean measurement
after retraining on S. The reported LDS is the mean over queries.

Confidence interval: basic (reverse-percentile) bootstrap, see
:func:`source_proj.evaluation.stats.basic_bootstrap_interval`. The default resamples the M subsets (as in the
SOURCE paper): it captures the uncertainty of the finite ground truth for the queries at hand,
which is what differs between runs of the same benchmark. ``resample="queries"`` instead
resamples the queries, for the uncertainty due to which queries were picked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from source_proj.errors import InputError
from source_proj.evaluation.ground_truth import LDSGroundTruth
from source_proj.evaluation.stats import basic_bootstrap_interval, spearman

RESAMPLE_KINDS = ("subsets", "queries")

# Bootstrap replicates per vectorised batch when resampling subsets (bounds memory).
_BOOTSTRAP_BATCH = 64


@dataclass(frozen=True)
class LDSResult:
    """An LDS with its bootstrap interval.

    Attributes:
        score: mean over queries of the per-query Spearman correlation (queries whose ground
            truth is constant are left out).
        ci_low, ci_high: bounds of the basic bootstrap interval (within [-1, 1]).
        per_query: (n_query,) per-query correlations (NaN where the ground truth is constant).
        confidence: the interval's nominal coverage, e.g. 0.95.
        resample: what the bootstrap resampled, "subsets" or "queries".
    """

    score: float
    ci_low: float
    ci_high: float
    per_query: np.ndarray
    confidence: float
    resample: str

    def __str__(self) -> str:
        return f"{self.score:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}]"


def predicted_group_effects(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(M, n_query) sums of ``scores`` (n_query, N) over each subset in ``masks`` (M, N)."""
    return masks.astype(scores.dtype) @ scores.T


def _mean_correlation(correlations: np.ndarray) -> np.ndarray:
    """Mean over the last axis, ignoring NaN; NaN where every entry is NaN."""
    valid = np.isfinite(correlations)
    count = valid.sum(axis=-1)
    total = np.where(valid, correlations, 0.0).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _bootstrap_subsets(
    predicted: np.ndarray, actual: np.ndarray, num_bootstrap: int, rng: np.random.Generator
) -> np.ndarray:
    samples = []
    num_subsets = predicted.shape[0]
    for start in range(0, num_bootstrap, _BOOTSTRAP_BATCH):
        count = min(_BOOTSTRAP_BATCH, num_bootstrap - start)
        idx = rng.integers(0, num_subsets, size=(count, num_subsets))
        samples.append(_mean_correlation(spearman(predicted[idx], actual[idx], axis=1)))
    return np.concatenate(samples)


def _bootstrap_queries(per_query: np.ndarray, num_bootstrap: int, rng: np.random.Generator) -> np.ndarray:
    idx = rng.integers(0, per_query.shape[0], size=(num_bootstrap, per_query.shape[0]))
    return _mean_correlation(per_query[idx])


def linear_datamodeling_score(
    scores: np.ndarray,
    ground_truth: LDSGroundTruth,
    num_bootstrap: int = 1000,
    confidence: float = 0.95,
    resample: str = "subsets",
    seed: int = 0,
) -> LDSResult:
    """LDS of ``scores`` against ``ground_truth``, with a basic bootstrap interval.

    Args:
        scores: (n_query, N) attribution scores for the ground truth's queries and attributed
            training rows; ``scores[q, m] > 0`` means row m raises query q's measurement.
        ground_truth: retraining measurements on random subsets.
        num_bootstrap: bootstrap replicates (>= 1).
        confidence: nominal coverage of the interval, in (0, 1).
        resample: "subsets" (default, as in the SOURCE paper) or "queries".
        seed: seed of the bootstrap draws.
    """
    scores = np.asarray(scores, dtype=np.float64)
    expected = (ground_truth.num_queries, ground_truth.num_train)
    if scores.shape != expected:
        raise InputError(f"scores must have shape (n_query, N) = {expected}, got {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise InputError("scores contain NaN or infinite values")
    if resample not in RESAMPLE_KINDS:
        raise InputError(f"resample must be one of {RESAMPLE_KINDS}, got {resample!r}")
    if isinstance(num_bootstrap, bool) or not isinstance(num_bootstrap, int) or num_bootstrap < 1:
        raise InputError(f"num_bootstrap must be a positive int, got {num_bootstrap!r}")
    predicted = predicted_group_effects(scores, ground_truth.masks)
    actual = ground_truth.mean
    per_query = spearman(predicted, actual, axis=0)
    rng = np.random.default_rng(seed)
    if resample == "subsets":
        samples = _bootstrap_subsets(predicted, actual, num_bootstrap, rng)
    else:
        samples = _bootstrap_queries(per_query, num_bootstrap, rng)
    score = float(_mean_correlation(per_query))
    low, high = basic_bootstrap_interval(score, samples, confidence)
    return LDSResult(
        score=score,
        ci_low=low,
        ci_high=high,
        per_query=per_query,
        confidence=confidence,
        resample=resample,
    )
