"""LDS machinery against oracles on a synthetic additive problem.

The problem: query q's measurement after training on rows S is sum_{m in S} E[q, m] plus
Gaussian retraining noise of std ``noise``, so E is an exact linear datamodel. For subsets of
n of N rows drawn without replacement, the group sum has variance n (N - n) / (N - 1) times
the population variance of E[q]; with R repeats the mean's noise has variance noise^2 / R.
For jointly Gaussian variables with correlation rho, Spearman's correlation is
(6 / pi) asin(rho / 2): that is the oracle LDS of the exact datamodel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from scipy.stats import spearmanr

from source_proj.evaluation import (
    LDSConfig,
    compute_ground_truth,
    linear_datamodeling_score,
)
from source_proj.evaluation.ground_truth import (
    LDSGroundTruth,
    ground_truth_noise,
    retrain_seeds,
)
from source_proj.evaluation.stats import spearman

CALLS = {"count": 0}


@dataclass(frozen=True)
class AdditiveRetrain:
    """Exact linear datamodel ``effects`` (n_query, N) plus N(0, noise^2) retraining noise."""

    effects: np.ndarray
    noise: float

    def __call__(self, indices: np.ndarray, seed: int) -> np.ndarray:
        CALLS["count"] += 1
        rng = np.random.default_rng(seed)
        return self.effects[:, indices].sum(axis=1) + self.noise * rng.standard_normal(self.effects.shape[0])


def _effects(num_queries: int, num_train: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((num_queries, num_train))


def _oracle_lds(effects: np.ndarray, noise: float, config: LDSConfig) -> float:
    num_train = effects.shape[1]
    n = config.subset_size(num_train)
    signal_var = n * (num_train - n) / (num_train - 1) * effects.var(axis=1)
    rho = np.sqrt(signal_var / (signal_var + noise**2 / config.repeats))
    return float(np.mean(6.0 / math.pi * np.arcsin(rho / 2.0)))


def test_spearman_matches_scipy_with_ties_and_degenerate_columns() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, size=(40, 7)).astype(float)  # many ties
    y = x + rng.integers(-3, 4, size=(40, 7))
    got = spearman(x, y, axis=0)
    expected = [spearmanr(x[:, j], y[:, j]).statistic for j in range(7)]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    const = np.ones((40, 1))
    assert spearman(const, y[:, :1], axis=0)[0] == 0.0  # constant prediction: no ranking
    assert np.isnan(spearman(y[:, :1], const, axis=0)[0])  # constant truth: undefined


def test_noise_free_exact_datamodel_has_lds_one() -> None:
    effects = _effects(6, 80)
    config = LDSConfig(num_subsets=30, repeats=1)
    truth = compute_ground_truth(AdditiveRetrain(effects, 0.0), 80, config, workers=1, progress=False)
    result = linear_datamodeling_score(effects, truth, num_bootstrap=50)
    assert result.score == pytest.approx(1.0, abs=1e-12)
    assert result.ci_low == pytest.approx(1.0, abs=1e-12)


def test_exact_datamodel_matches_gaussian_oracle_and_negation_flips_sign() -> None:
    effects = _effects(20, 200)
    noise = 4.0  # group-sum std is about 7: oracle LDS about 0.9
    config = LDSConfig(num_subsets=100, repeats=2)
    truth = compute_ground_truth(AdditiveRetrain(effects, noise), 200, config, workers=1, progress=False)
    result = linear_datamodeling_score(effects, truth, num_bootstrap=200)
    oracle = _oracle_lds(effects, noise, config)
    assert 0.8 < oracle < 0.97
    assert result.score == pytest.approx(oracle, abs=0.04)
    assert result.ci_low <= result.score <= result.ci_high
    negated = linear_datamodeling_score(-effects, truth, num_bootstrap=10)
    assert negated.score == pytest.approx(-result.score, abs=1e-12)


def test_random_scores_have_lds_near_zero_and_interval_covers_zero() -> None:
    effects = _effects(20, 200)
    config = LDSConfig(num_subsets=100, repeats=1)
    truth = compute_ground_truth(AdditiveRetrain(effects, 0.5), 200, config, workers=1, progress=False)
    random_scores = np.random.default_rng(7).standard_normal(effects.shape)
    result = linear_datamodeling_score(random_scores, truth, num_bootstrap=300)
    # per-query Spearman of independent data has std 1/sqrt(M - 1) = 0.1; the mean of 20: 0.022
    assert abs(result.score) < 0.1
    assert result.ci_low < 0.0 < result.ci_high


@pytest.mark.parametrize("num_queries, noise", [(20, 4.0), (4, 15.0)])
def test_subset_bootstrap_interval_covers_the_oracle_about_95_percent(num_queries: int, noise: float) -> None:
    # (20, 4.0): a high LDS (0.92) known to a narrow interval, where a plain percentile
    # interval covers under half the time; (4, 15.0): a moderate LDS (0.54) and a wide one.
    effects = _effects(num_queries, 200, seed=3)
    covered = []
    for replicate in range(80):
        config = LDSConfig(num_subsets=100, repeats=2, seed=replicate)
        oracle = _oracle_lds(effects, noise, config)
        truth = compute_ground_truth(AdditiveRetrain(effects, noise), 200, config, workers=1, progress=False)
        result = linear_datamodeling_score(effects, truth, num_bootstrap=200, seed=replicate)
        covered.append(result.ci_low <= oracle <= result.ci_high)
    # nominal 0.95; the binomial std over 80 replicates is 0.025
    assert 0.87 <= np.mean(covered) <= 1.0, (np.mean(covered), oracle)


def test_query_bootstrap_matches_normal_interval_of_the_query_mean() -> None:
    effects = _effects(40, 100)
    config = LDSConfig(num_subsets=40, repeats=1)
    truth = compute_ground_truth(AdditiveRetrain(effects, 5.0), 100, config, workers=1, progress=False)
    result = linear_datamodeling_score(effects, truth, num_bootstrap=4000, resample="queries")
    half_width = 1.96 * result.per_query.std(ddof=1) / math.sqrt(40)
    assert result.ci_low == pytest.approx(result.score - half_width, abs=0.2 * half_width)
    assert result.ci_high == pytest.approx(result.score + half_width, abs=0.2 * half_width)


def test_noise_report_matches_analytic_noise_to_signal() -> None:
    effects = _effects(10, 200)
    noise = 3.0
    config = LDSConfig(num_subsets=100, repeats=4)
    truth = compute_ground_truth(AdditiveRetrain(effects, noise), 200, config, workers=1, progress=False)
    n = config.subset_size(200)
    signal_std = np.sqrt(n * (200 - n) / 199 * effects.var(axis=1))
    expected_ratio = float(np.mean(noise / math.sqrt(config.repeats) / signal_std))
    report = truth.noise()
    assert report.noise_to_signal == pytest.approx(expected_ratio, rel=0.2)
    assert 0.9 < report.split_half_reliability < 1.0
    pure_noise = ground_truth_noise(np.random.default_rng(0).standard_normal((100, 4, 10)))
    assert abs(pure_noise.split_half_reliability) < 0.15


def test_cache_is_reused_and_invalidated_when_the_setup_changes(tmp_path) -> None:
    path = tmp_path / "gt.npz"
    effects = _effects(3, 50)
    config = LDSConfig(num_subsets=10, repeats=2)

    def run(retrain, cfg=config, **kwargs) -> tuple[LDSGroundTruth, int]:
        before = CALLS["count"]
        truth = compute_ground_truth(retrain, 50, cfg, cache_path=path, workers=1, progress=False, **kwargs)
        return truth, CALLS["count"] - before

    first, calls = run(AdditiveRetrain(effects, 0.1))
    assert calls == 20
    again, calls = run(AdditiveRetrain(effects.copy(), 0.1))  # equal setup, new object
    assert calls == 0
    np.testing.assert_array_equal(again.masks, first.masks)
    np.testing.assert_array_equal(again.measurements, first.measurements)
    assert run(AdditiveRetrain(effects, 0.2))[1] == 20  # hyperparameter changed
    assert run(AdditiveRetrain(effects, 0.2), LDSConfig(num_subsets=10, repeats=3))[1] == 30
    assert run(AdditiveRetrain(effects, 0.2), LDSConfig(num_subsets=10, repeats=3))[1] == 0
    assert run(AdditiveRetrain(effects, 0.2), LDSConfig(num_subsets=10, repeats=3), setup_key="v2")[1] == 30


def test_unpicklable_retrain_needs_a_setup_key_for_caching(tmp_path) -> None:
    def local(indices: np.ndarray, seed: int) -> np.ndarray:
        return np.array([indices.sum() + seed], dtype=float)

    config = LDSConfig(num_subsets=4, repeats=1)
    with pytest.raises(ValueError, match="setup_key"):
        compute_ground_truth(local, 10, config, cache_path=tmp_path / "a.npz", workers=1, progress=False)
    truth = compute_ground_truth(
        local, 10, config, cache_path=tmp_path / "a.npz", setup_key="sum", workers=2, progress=False
    )  # unpicklable with 2 workers: serial fallback
    expected = truth.masks.astype(float) @ np.arange(10) + retrain_seeds(config)[:, 0]
    np.testing.assert_array_equal(truth.measurements[:, 0, 0], expected)


def test_parallel_retraining_matches_serial() -> None:
    retrain = AdditiveRetrain(_effects(3, 40), 0.3)
    config = LDSConfig(num_subsets=6, repeats=2)
    serial = compute_ground_truth(retrain, 40, config, workers=1, progress=False)
    parallel = compute_ground_truth(retrain, 40, config, workers=2, progress=False)
    np.testing.assert_array_equal(parallel.measurements, serial.measurements)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"fraction": 1.5}, "fraction"),
        ({"num_subsets": 2}, "num_subsets"),
        ({"repeats": 0}, "repeats"),
    ],
)
def test_bad_config_is_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LDSConfig(**kwargs)


def test_bad_scores_and_measurements_are_rejected() -> None:
    effects = _effects(3, 20)
    truth = compute_ground_truth(
        AdditiveRetrain(effects, 0.0), 20, LDSConfig(num_subsets=5, repeats=1), workers=1, progress=False
    )
    with pytest.raises(ValueError, match="shape"):
        linear_datamodeling_score(effects[:, :10], truth)
    with pytest.raises(ValueError, match="resample"):
        linear_datamodeling_score(effects, truth, resample="rows")
    with pytest.raises(ValueError, match="1-D"):
        compute_ground_truth(lambda i, s: np.zeros((2, 2)), 20, LDSConfig(num_subsets=3), workers=1, progress=False)
    with pytest.raises(ValueError, match="non-finite"):
        compute_ground_truth(lambda i, s: np.array([np.nan]), 20, LDSConfig(num_subsets=3), workers=1, progress=False)
    with pytest.raises(ValueError, match="num_train"):
        compute_ground_truth(AdditiveRetrain(effects, 0.0), 1, LDSConfig(num_subsets=3), workers=1, progress=False)
