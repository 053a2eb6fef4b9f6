"""Subset-removal counterfactual: does removing a query's top proponents flip its prediction?

Protocol (classification, measurement = margin, ``scores[q, m] > 0`` = row m helps query q):

1. Train on all N rows with each of the evaluation seeds; keep the queries whose margin is
   positive for every seed (correctly classified).
2. For each removal size k in increasing order and each kept query not yet flipped, remove
   the query's first k rows of an ordering (a method: its rows by decreasing score; the
   baseline: a random permutation of the training rows of the query's class), retrain with
   each seed, and call the query flipped when its margin averaged over the seeds is <= 0.
3. Report, per k, the fraction of kept queries flipped by removing at most k rows.

The same seeds are used for every method and k (common random numbers), so differences
between methods are not differences of training noise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from source_proj.errors import InputError
from source_proj.evaluation.retraining import RetrainFn, RetrainJob, RetrainRunner

RANDOM_BASELINE = "random (same class)"


@dataclass(frozen=True)
class CounterfactualConfig:
    """Settings of the subset-removal counterfactual.

    Attributes:
        ks: removal sizes, strictly increasing positive ints.
        num_seeds: retrainings per removal (the margin is averaged over them).
        seed: seed of the retraining seeds and of the random baseline's draws.
    """

    ks: tuple[int, ...] = (5, 10, 20, 40)
    num_seeds: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        ks = tuple(self.ks)
        if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
            raise InputError(f"ks must be positive ints, got {self.ks!r}")
        if any(b <= a for a, b in zip(ks, ks[1:])):
            raise InputError(f"ks must be strictly increasing, got {self.ks!r}")
        object.__setattr__(self, "ks", ks)
        if isinstance(self.num_seeds, bool) or not isinstance(self.num_seeds, int) or self.num_seeds < 1:
            raise InputError(f"num_seeds must be a positive int, got {self.num_seeds!r}")

    def retrain_seeds(self) -> list[int]:
        """The seeds every retraining of the evaluation uses."""
        rng = np.random.default_rng([self.seed, 0xC0F])
        return [int(s) for s in rng.choice(2**31 - 1, size=self.num_seeds, replace=False)]


@dataclass(frozen=True)
class CounterfactualCurve:
    """Flip fractions of one removal ordering.

    Attributes:
        ks: (K,) removal sizes.
        flipped_fraction: (K,) fraction of the evaluated queries flipped after removing at
            most k rows.
        first_flip_k: (n_eval,) smallest k that flipped each evaluated query, 0 if none did.
    """

    ks: np.ndarray
    flipped_fraction: np.ndarray
    first_flip_k: np.ndarray


@dataclass(frozen=True)
class CounterfactualResult:
    """Curves of several orderings on the same evaluated queries.

    Attributes:
        queries: (n_eval,) indices of the correctly classified queries that were evaluated.
        curves: name -> curve; includes :data:`RANDOM_BASELINE`.
    """

    queries: np.ndarray
    curves: dict[str, CounterfactualCurve]


def proponent_ordering(scores: np.ndarray) -> np.ndarray:
    """(n_query, N) row indices per query by decreasing score (ties by lower index)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), axis=1, kind="stable")


def random_same_class_ordering(
    train_labels: np.ndarray, query_labels: np.ndarray, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per query, a random permutation of the training rows sharing the query's label."""
    return [rng.permutation(np.flatnonzero(train_labels == label)) for label in query_labels]


def _kept_indices(num_train: int, removed: np.ndarray) -> np.ndarray:
    keep = np.ones(num_train, dtype=bool)
    keep[removed] = False
    return np.flatnonzero(keep)


def correctly_classified(runner: RetrainRunner, num_train: int, seeds: Sequence[int]) -> np.ndarray:
    """(n_query,) bool: margin > 0 after training on all rows with every seed."""
    everything = np.arange(num_train)
    margins = runner.run([RetrainJob(everything, s) for s in seeds], desc="full-data training")
    return np.all(np.stack(margins) > 0, axis=0)


def flip_curve(
    runner: RetrainRunner,
    orderings: Sequence[np.ndarray],
    queries: np.ndarray,
    num_train: int,
    config: CounterfactualConfig,
    desc: str = "counterfactual",
) -> CounterfactualCurve:
    """Flip fractions when removing the first k rows of each query's ordering.

    Args:
        runner: runs the retrainings; its ``retrain`` returns per-query margins.
        orderings: one row-index array per evaluated query (same order as ``queries``), of
            length >= max(ks).
        queries: (n_eval,) indices of the evaluated queries into the measurement vector.
        num_train: N.
        config: removal sizes and seeds.
    """
    if len(orderings) != len(queries):
        raise InputError(f"{len(orderings)} orderings for {len(queries)} queries")
    too_short = [int(q) for q, o in zip(queries, orderings) if len(o) < config.ks[-1]]
    if too_short:
        raise InputError(
            f"orderings of queries {too_short[:5]} have fewer than max(ks) = {config.ks[-1]} rows"
        )
    seeds = config.retrain_seeds()
    first_flip = np.zeros(len(queries), dtype=np.int64)
    fractions = []
    for k in config.ks:
        pending = np.flatnonzero(first_flip == 0)
        jobs = [
            RetrainJob(_kept_indices(num_train, orderings[int(i)][:k]), s) for i in pending for s in seeds
        ]
        results = runner.run(jobs, desc=f"{desc}, k={k}")
        for j, i in enumerate(pending):
            block = results[j * len(seeds) : (j + 1) * len(seeds)]
            if np.mean([r[queries[i]] for r in block]) <= 0:
                first_flip[i] = k
        fractions.append(float(np.mean(first_flip > 0)) if len(queries) else float("nan"))
    return CounterfactualCurve(np.asarray(config.ks), np.asarray(fractions), first_flip)


def subset_removal(
    scores: Mapping[str, np.ndarray],
    retrain: RetrainFn,
    train_labels: np.ndarray,
    query_labels: np.ndarray,
    config: CounterfactualConfig = CounterfactualConfig(),
    max_queries: int | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> CounterfactualResult:
    """Subset-removal counterfactual of several methods against random same-class removal.

    Args:
        scores: method name -> (n_query, N) scores (``> 0``: the row raises the margin).
        retrain: ``retrain(train_indices, seed) -> (n_query,)`` margins.
        train_labels: (N,) class of each training row.
        query_labels: (n_query,) class of each query.
        config: removal sizes and seeds.
        max_queries: evaluate at most this many correctly classified queries (the first ones).
        workers: retraining processes (None: all available cores; 1: serial).
        progress: show progress bars.
    """
    train_labels = np.asarray(train_labels)
    query_labels = np.asarray(query_labels)
    num_train = train_labels.shape[0]
    for name, s in scores.items():
        if np.shape(s) != (query_labels.shape[0], num_train):
            raise InputError(
                f"scores of {name!r} must be (n_query, N) = {(query_labels.shape[0], num_train)}, "
                f"got {np.shape(s)}"
            )
    if RANDOM_BASELINE in scores:
        raise InputError(f"{RANDOM_BASELINE!r} is reserved for the baseline")
    with RetrainRunner(retrain, workers=workers, progress=progress) as runner:
        correct = correctly_classified(runner, num_train, config.retrain_seeds())
        if correct.shape != query_labels.shape:
            raise InputError(f"retrain returned {correct.shape[0]} margins for {query_labels.shape[0]} queries")
        queries = np.flatnonzero(correct)[:max_queries]
        rng = np.random.default_rng([config.seed, 0xBA5E])
        orderings = {RANDOM_BASELINE: random_same_class_ordering(train_labels, query_labels[queries], rng)}
        for name, s in scores.items():
            orderings[name] = list(proponent_ordering(np.asarray(s)[queries]))
        curves = {
            name: flip_curve(runner, order, queries, num_train, config, desc=name)
            for name, order in orderings.items()
        }
    return CounterfactualResult(queries=queries, curves=curves)
