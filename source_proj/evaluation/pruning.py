"""Verification of a curation ranking by retraining: does dropping the rows it ranks first help?

Protocol. The user provides ``retrain(train_indices, seed)`` that trains a fresh model on the
given rows and returns the target metric (a float, e.g. test accuracy, or a 1-D array of
metrics). For each removal fraction f (N_f = round(f N) rows) and each ranking (scores,
larger = removed first), the top N_f rows are dropped and the model retrained with each of S
seeds; a random ranking, drawn anew for every seed, is the baseline. The unpruned model is
trained with the same S seeds, and every arm reuses them (common random numbers), so the
change of the metric is measured per seed, ``metric(pruned, s) - metric(full, s)``, and its
mean gets a Student-t interval over the seeds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import t as student_t

from source_proj.errors import InputError
from source_proj.evaluation.retraining import RetrainJob, RetrainRunner

RANDOM = "random"
FULL = "unpruned"


@dataclass(frozen=True)
class PruningConfig:
    """Settings of the pruning verification.

    Attributes:
        fractions: removal fractions in (0, 1), strictly increasing.
        num_seeds: S, retrainings per arm (>= 2 for an interval).
        seed: seed of the retraining seeds and of the random baseline's draws.
        confidence: level of the intervals, in (0, 1).
        random_baseline: also remove random rows.
    """

    fractions: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1)
    num_seeds: int = 5
    seed: int = 0
    confidence: float = 0.95
    random_baseline: bool = True

    def __post_init__(self) -> None:
        fractions = tuple(float(f) for f in self.fractions)
        if not fractions or any(not 0 < f < 1 for f in fractions) or any(b <= a for a, b in zip(fractions, fractions[1:])):
            raise InputError(f"fractions must be strictly increasing numbers in (0, 1), got {self.fractions!r}")
        object.__setattr__(self, "fractions", fractions)
        if isinstance(self.num_seeds, bool) or not isinstance(self.num_seeds, int) or self.num_seeds < 1:
            raise InputError(f"num_seeds must be a positive int, got {self.num_seeds!r}")
        if not 0 < self.confidence < 1:
            raise InputError(f"confidence must lie in (0, 1), got {self.confidence!r}")

    def retrain_seeds(self) -> list[int]:
        """The S seeds every arm retrains with."""
        rng = np.random.default_rng([self.seed, 0x9A7E])
        return [int(s) for s in rng.choice(2**31 - 1, size=self.num_seeds, replace=False)]

    def removal_counts(self, num_train: int) -> list[int]:
        """Rows removed at each fraction: round(f N), at least 1, below N."""
        counts = [max(1, int(round(f * num_train))) for f in self.fractions]
        if counts[-1] >= num_train:
            raise InputError(f"fraction {self.fractions[-1]} of {num_train} rows removes every row")
        return counts


@dataclass(frozen=True)
class _AsVector:
    """Picklable wrapper: a metric (float or 1-D array) as the 1-D array the runner wants."""

    retrain: Callable[[np.ndarray, int], Any]

    def __call__(self, indices: np.ndarray, seed: int) -> np.ndarray:
        return np.atleast_1d(np.asarray(self.retrain(indices, seed), dtype=np.float64))


def mean_interval(values: np.ndarray, confidence: float) -> tuple[float, float, float]:
    """Mean of ``values`` (S,) and its Student-t interval (NaN bounds for S < 2)."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if values.size < 2:
        return mean, float("nan"), float("nan")
    half = float(student_t.ppf(0.5 + confidence / 2, values.size - 1) * values.std(ddof=1) / np.sqrt(values.size))
    return mean, mean - half, mean + half


@dataclass(frozen=True)
class PruningResult:
    """Retrained metrics of every arm.

    Attributes:
        fractions: (F,) removal fractions; removed: (F,) rows removed at each.
        seeds: the S retraining seeds.
        full: (S, n_metric) metrics of the unpruned model per seed.
        metrics: ranking name (and "random") -> (F, S, n_metric) metrics after removal.
        confidence: level of the intervals.
    """

    fractions: np.ndarray
    removed: np.ndarray
    seeds: tuple[int, ...]
    full: np.ndarray
    metrics: Mapping[str, np.ndarray]
    confidence: float

    def change(self, name: str) -> np.ndarray:
        """(F, S, n_metric) per-seed change of the metric, pruned minus unpruned."""
        return self.metrics[name] - self.full[None]

    def summary(self, metric: int = 0) -> list[dict[str, Any]]:
        """One dict per (arm, fraction), the unpruned model first: the metric's mean and
        interval over seeds, and its paired change against the unpruned model."""
        full = self.full[:, metric]
        mean, low, high = mean_interval(full, self.confidence)
        rows = [{"ranking": FULL, "fraction": 0.0, "removed": 0, "mean": mean, "low": low, "high": high,
                 "change": 0.0, "change_low": 0.0, "change_high": 0.0}]
        for name, values in self.metrics.items():
            for i, fraction in enumerate(self.fractions):
                mean, low, high = mean_interval(values[i, :, metric], self.confidence)
                change, change_low, change_high = mean_interval(values[i, :, metric] - full, self.confidence)
                rows.append({"ranking": name, "fraction": float(fraction), "removed": int(self.removed[i]),
                             "mean": mean, "low": low, "high": high,
                             "change": change, "change_low": change_low, "change_high": change_high})
        return rows


def removal_order(scores: np.ndarray) -> np.ndarray:
    """Row indices by decreasing score (ties: lower row first)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def _kept(order: np.ndarray, count: int) -> np.ndarray:
    return np.sort(order[count:]).astype(np.int64)


def pruning_curve(
    retrain: Callable[[np.ndarray, int], Any],
    rankings: Mapping[str, np.ndarray],
    num_train: int,
    config: PruningConfig = PruningConfig(),
    *,
    workers: int | None = None,
    progress: bool = True,
) -> PruningResult:
    """Retrain after dropping each ranking's top rows (and random rows) at every fraction.

    Args:
        retrain: ``retrain(train_indices, seed) -> metric`` (float or 1-D array), e.g. test
            accuracy of a model trained on those rows; picklable to run in ``workers``
            processes.
        rankings: name -> (N,) scores, larger = removed first (e.g. a ``CurationTable``'s
            ``score`` column, or the final training losses as a baseline).
        num_train: N.
        config: fractions, seeds, interval level, random baseline.
        workers: retraining processes (None: all cores; 1: serial).
        progress: show a progress bar.
    """
    if RANDOM in rankings or FULL in rankings:
        raise InputError(f"ranking names {RANDOM!r} and {FULL!r} are reserved")
    orders = {}
    for name, scores in rankings.items():
        values = np.asarray(scores, dtype=np.float64)
        if values.shape != (num_train,) or not np.all(np.isfinite(values)):
            raise InputError(f"ranking {name!r} must be finite scores of shape ({num_train},), got {values.shape}")
        orders[name] = removal_order(values)
    seeds = config.retrain_seeds()
    counts = config.removal_counts(num_train)
    jobs = [RetrainJob(np.arange(num_train), s) for s in seeds]
    arms: list[str] = list(orders) + ([RANDOM] if config.random_baseline else [])
    for name in arms:
        for count in counts:
            for j, s in enumerate(seeds):
                order = orders[name] if name != RANDOM else np.random.default_rng([config.seed, 0xA11, j]).permutation(num_train)
                jobs.append(RetrainJob(_kept(order, count), s))
    with RetrainRunner(_AsVector(retrain), workers=workers, progress=progress) as runner:
        results = runner.run(jobs, desc="pruning")
    widths = {r.shape for r in results}
    if len(widths) != 1:
        raise InputError(f"retrain returned metrics of different shapes {sorted(widths)}")
    stacked = np.stack(results)
    n_seed, n_frac = len(seeds), len(counts)
    full = stacked[:n_seed]
    arm_values = stacked[n_seed:].reshape(len(arms), n_frac, n_seed, -1)
    return PruningResult(
        fractions=np.asarray(config.fractions),
        removed=np.asarray(counts),
        seeds=tuple(seeds),
        full=full,
        metrics={name: arm_values[i] for i, name in enumerate(arms)},
        confidence=config.confidence,
    )
