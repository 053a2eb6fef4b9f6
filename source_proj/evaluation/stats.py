"""Rank correlation and bootstrap intervals used by the evaluation protocols."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from source_proj.errors import InputError


def pearson(x: np.ndarray, y: np.ndarray, axis: int = -2) -> np.ndarray:
    """Pearson correlation of ``x`` and ``y`` (same shape) along ``axis``.

    Where ``x`` is constant the result is 0 (a constant prediction carries no ranking); where
    ``y`` is constant it is NaN (nothing to predict).
    """
    xc = x - x.mean(axis=axis, keepdims=True)
    yc = y - y.mean(axis=axis, keepdims=True)
    sxx = (xc * xc).sum(axis=axis)
    syy = (yc * yc).sum(axis=axis)
    sxy = (xc * yc).sum(axis=axis)
    # Relative thresholds: a column is constant when its spread is round-off of its scale.
    tiny_x = sxx <= 1e-24 * np.maximum(1.0, (x * x).sum(axis=axis))
    tiny_y = syy <= 1e-24 * np.maximum(1.0, (y * y).sum(axis=axis))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = sxy / np.sqrt(sxx * syy)
    r = np.where(tiny_x, 0.0, r)
    return np.where(tiny_y, np.nan, r)


def spearman(x: np.ndarray, y: np.ndarray, axis: int = -2) -> np.ndarray:
    """Spearman rank correlation of ``x`` and ``y`` along ``axis`` (ties get average ranks).

    For (M, Q) inputs and the default axis this is one correlation per column, shape (Q,);
    leading batch axes are kept. Constant ``x`` gives 0 and constant ``y`` NaN (see
    :func:`pearson`).
    """
    if x.shape != y.shape:
        raise InputError(f"shapes differ: {x.shape} vs {y.shape}")
    return pearson(rankdata(x, axis=axis), rankdata(y, axis=axis), axis=axis)


def basic_bootstrap_interval(estimate: float, samples: np.ndarray, confidence: float) -> tuple[float, float]:
    """Basic (reverse-percentile) bootstrap interval ``[2 e - q_hi, 2 e - q_lo]``.

    ``q_lo, q_hi`` are the central ``confidence`` percentiles of the bootstrap ``samples``
    (NaNs dropped) and ``e`` the estimate. Unlike the plain percentile interval it corrects
    for the bootstrap's bias: resampling subsets with replacement duplicates them, which pulls
    a rank correlation down, and the percentile interval of a high LDS then misses the true
    value most of the time. Bounds are clipped to [-1, 1], the range of a correlation.
    """
    if not 0.0 < confidence < 1.0:
        raise InputError(f"confidence must lie in (0, 1), got {confidence!r}")
    finite = samples[np.isfinite(samples)]
    if finite.size == 0 or not np.isfinite(estimate):
        return float("nan"), float("nan")
    tail = 50.0 * (1.0 - confidence)
    q_low, q_high = np.percentile(finite, [tail, 100.0 - tail])
    return float(np.clip(2 * estimate - q_high, -1, 1)), float(np.clip(2 * estimate - q_low, -1, 1))
