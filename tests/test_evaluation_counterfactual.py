"""Subset-removal counterfactual on a 1-D nearest-centroid classifier whose answer is known.

Class 0: three "support" rows at x = 1 and 27 rows at x = -3 (centroid -2.6); class 1: 30
rows at x = 3. The margin of a query at x with label y is (x - c_other)^2 - (x - c_y)^2.
Query 0 (x = 0.1, class 0) is classified correctly only thanks to the support rows: removing
two of them moves c0 to -2.857 and flips it. Queries 1 and 3 cannot be flipped by removing a
few rows; query 2 (x = 2.9, class 0) is misclassified from the start and must be skipped.
The oracle below recomputes margins from the closed form, independently of the code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from source_proj.evaluation import (
    RANDOM_BASELINE,
    CounterfactualConfig,
    RetrainRunner,
    subset_removal,
)
from source_proj.evaluation.counterfactual import flip_curve, proponent_ordering

X = np.concatenate([np.full(3, 1.0), np.full(27, -3.0), np.full(30, 3.0)])
Y = np.concatenate([np.zeros(30, dtype=int), np.ones(30, dtype=int)])
QUERY_X = np.array([0.1, -1.0, 2.9, 2.5])
QUERY_Y = np.array([0, 0, 0, 1])


def centroid_margins(kept: np.ndarray) -> np.ndarray:
    """Oracle: (n_query,) nearest-centroid margins after training on rows ``kept``."""
    c = np.array([X[kept][Y[kept] == label].mean() for label in (0, 1)])
    own = (QUERY_X - c[QUERY_Y]) ** 2
    other = (QUERY_X - c[1 - QUERY_Y]) ** 2
    return other - own


@dataclass(frozen=True)
class CentroidRetrain:
    """Nearest-centroid 'training' with a small seed-dependent jitter of the margins."""

    jitter: float = 1e-3

    def __call__(self, indices: np.ndarray, seed: int) -> np.ndarray:
        noise = np.random.default_rng(seed).standard_normal(len(QUERY_X))
        return centroid_margins(indices) + self.jitter * noise


def leave_one_out_scores() -> np.ndarray:
    """Oracle scores: margin with row m minus margin without it, (n_query, N)."""
    everything = np.arange(len(X))
    full = centroid_margins(everything)
    return np.stack([full - centroid_margins(np.delete(everything, m)) for m in everything], axis=1)


def expected_first_flip(ordering: np.ndarray, query: int, ks: tuple[int, ...]) -> int:
    for k in ks:
        if centroid_margins(np.setdiff1d(np.arange(len(X)), ordering[:k]))[query] <= 0:
            return k
    return 0


def test_top_proponents_flip_the_query_that_depends_on_them() -> None:
    config = CounterfactualConfig(ks=(1, 2, 3, 5), num_seeds=2)
    result = subset_removal(
        {"leave-one-out": leave_one_out_scores()}, CentroidRetrain(), Y, QUERY_Y, config, workers=1, progress=False
    )
    np.testing.assert_array_equal(result.queries, [0, 1, 3])  # query 2 is misclassified
    curve = result.curves["leave-one-out"]
    np.testing.assert_array_equal(curve.first_flip_k, [2, 0, 0])
    np.testing.assert_allclose(curve.flipped_fraction, [0, 1 / 3, 1 / 3, 1 / 3])
    random_curve = result.curves[RANDOM_BASELINE]
    assert np.all(random_curve.flipped_fraction <= curve.flipped_fraction)


def test_flip_curve_agrees_with_the_closed_form_for_arbitrary_orderings() -> None:
    rng = np.random.default_rng(5)
    ks = (2, 4, 8)
    queries = np.array([0, 1, 3])
    # query 0's ordering starts with two support rows, so it flips at k = 2
    orderings = [np.concatenate([[0, 1], rng.permutation(np.arange(2, len(X)))])]
    orderings += [rng.permutation(len(X)) for _ in queries[1:]]
    config = CounterfactualConfig(ks=ks, num_seeds=1)
    with RetrainRunner(CentroidRetrain(jitter=0.0), workers=1, progress=False) as runner:
        curve = flip_curve(runner, orderings, queries, len(X), config)
    expected = [expected_first_flip(o, q, ks) for o, q in zip(orderings, queries)]
    np.testing.assert_array_equal(curve.first_flip_k, expected)
    for j, k in enumerate(ks):
        assert curve.flipped_fraction[j] == pytest.approx(np.mean([0 < e <= k for e in expected]))


def test_proponent_ordering_sorts_by_decreasing_score() -> None:
    scores = np.array([[0.5, -1.0, 2.0, 0.5]])
    np.testing.assert_array_equal(proponent_ordering(scores), [[2, 0, 3, 1]])


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="increasing"):
        CounterfactualConfig(ks=(5, 3))
    with pytest.raises(ValueError, match="positive"):
        CounterfactualConfig(ks=(0, 3))
    with pytest.raises(ValueError, match="n_query, N"):
        subset_removal({"bad": np.zeros((4, 3))}, CentroidRetrain(), Y, QUERY_Y, workers=1, progress=False)
    with pytest.raises(ValueError, match="fewer than max"):
        subset_removal(
            {"ok": leave_one_out_scores()},
            CentroidRetrain(),
            Y,
            QUERY_Y,
            CounterfactualConfig(ks=(10, 40)),  # class 0 has only 30 rows for the random baseline
            workers=1,
            progress=False,
        )
