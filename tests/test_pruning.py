"""Pruning verification against a retrain function whose metric is known in closed form, and
(slow) against real retraining with planted flipped labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy.stats import t as student_t
from tiny_models import mlp

from source_proj.evaluation.pruning import (
    RANDOM,
    PruningConfig,
    mean_interval,
    pruning_curve,
)
from source_proj.evaluation.training import TrainSettings, train_sgd
from source_proj.gradients.tasks import ClassificationTask

N = 200
BAD = np.arange(0, N, 10)  # 20 harmful rows


@dataclass(frozen=True)
class KnownMetric:
    """metric = 1 - 0.01 x (harmful rows kept) - 0.001 x (rows removed) + a per-seed offset:
    the change after a removal is known exactly, whatever the seed."""

    def __call__(self, indices: np.ndarray, seed: int) -> np.ndarray:
        kept_bad = np.isin(BAD, indices).sum()
        offset = np.random.default_rng(seed).normal(0, 0.05)
        return np.array([1 - 0.01 * kept_bad - 0.001 * (N - len(indices)) + offset, len(indices)])


def test_pruning_changes_are_paired_by_seed_and_exact() -> None:
    oracle = np.zeros(N)
    oracle[BAD] = 1.0 + np.arange(20)  # every harmful row first
    reversed_ = -oracle
    config = PruningConfig(fractions=(0.05, 0.1, 0.2), num_seeds=4, seed=3)
    result = pruning_curve(KnownMetric(), {"oracle": oracle, "reversed": reversed_}, N, config, workers=1, progress=False)
    np.testing.assert_array_equal(result.removed, [10, 20, 40])
    for i, removed in enumerate(result.removed):
        good = min(removed, 20)  # harmful rows removed by the oracle ordering
        np.testing.assert_allclose(result.change("oracle")[i, :, 0], 0.01 * good - 0.001 * removed, atol=1e-12)
        np.testing.assert_allclose(result.change("reversed")[i, :, 0], -0.001 * removed, atol=1e-12)
        np.testing.assert_array_equal(result.metrics["oracle"][i, :, 1], N - removed)  # 1-D metrics are kept
    # random removal: per seed, the harmful rows its permutation put first
    for j in range(4):
        perm = np.random.default_rng([3, 0xA11, j]).permutation(N)
        for i, removed in enumerate(result.removed):
            expected = 0.01 * np.isin(perm[:removed], BAD).sum() - 0.001 * removed
            assert result.change(RANDOM)[i, j, 0] == pytest.approx(expected, abs=1e-12)
    rows = result.summary()
    assert rows[0]["ranking"] == "unpruned" and len(rows) == 1 + 3 * 3
    row = next(r for r in rows if r["ranking"] == "oracle" and r["fraction"] == 0.1)
    values = result.metrics["oracle"][1, :, 0]
    half = student_t.ppf(0.975, 3) * values.std(ddof=1) / 2
    assert row["mean"] == pytest.approx(values.mean()) and row["high"] - row["low"] == pytest.approx(2 * half)
    assert row["change"] == pytest.approx(0.2 - 0.02) and row["change_high"] - row["change_low"] < 1e-9


def test_mean_interval_and_bad_input() -> None:
    values = np.array([1.0, 2.0, 4.0])
    mean, low, high = mean_interval(values, 0.9)
    expected = student_t.interval(0.9, 2, loc=values.mean(), scale=values.std(ddof=1) / np.sqrt(3))
    assert mean == pytest.approx(7 / 3) and (low, high) == pytest.approx(expected)
    assert np.isnan(mean_interval(np.array([1.0]), 0.95)[1])
    with pytest.raises(ValueError, match="strictly increasing"):
        PruningConfig(fractions=(0.1, 0.05))
    with pytest.raises(ValueError, match=r"shape \(200,\)"):
        pruning_curve(KnownMetric(), {"short": np.zeros(5)}, N, workers=1, progress=False)
    with pytest.raises(ValueError, match="reserved"):
        pruning_curve(KnownMetric(), {"random": np.zeros(N)}, N, workers=1, progress=False)


@dataclass(frozen=True)
class FlippedBlobs:
    """Picklable retrain: an MLP on 3 clusters with 15% flipped labels; test accuracy."""

    seed: int = 0

    def data(self) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        centers = 1.5 * torch.randn(3, 6, generator=gen)
        y = torch.arange(500) % 3
        x = centers[y] + torch.randn(500, 6, generator=gen)
        rng = np.random.default_rng(self.seed)
        flipped = np.zeros(300, dtype=bool)
        flipped[rng.choice(300, 45, replace=False)] = True
        noisy = y[:300].clone()
        noisy[torch.from_numpy(flipped)] = (noisy[torch.from_numpy(flipped)] + 1) % 3
        return x[:300], noisy, flipped, x[300:], y[300:]

    def __call__(self, indices: np.ndarray, seed: int) -> float:
        x, noisy, _, x_test, y_test = self.data()
        model = mlp((6, 16, 3), seed)
        settings = TrainSettings(epochs=40, batch_size=20, lr=0.1, momentum=0.9, weight_decay=1e-4, seed=seed)
        train_sgd(model, ClassificationTask(), x[indices], noisy[indices], settings)
        with torch.no_grad():
            return float((model(x_test).argmax(1) == y_test).float().mean())


@pytest.mark.slow
def test_dropping_planted_flips_beats_random_removal_by_retraining() -> None:
    """Removing the flipped rows (an oracle ranking) must raise retrained test accuracy above
    random removal of as many rows, with disjoint 95% intervals over 6 seeds."""
    retrain = FlippedBlobs()
    flipped = retrain.data()[2]
    config = PruningConfig(fractions=(0.15,), num_seeds=6)
    result = pruning_curve(retrain, {"flipped first": flipped.astype(float)}, 300, config, workers=1, progress=False)
    rows = {r["ranking"]: r for r in result.summary()}
    assert rows["flipped first"]["low"] > rows[RANDOM]["high"]
    assert rows["flipped first"]["change_low"] > 0
