"""Benchmark scenarios on data that ships with scikit-learn, after the SOURCE paper's setups.

Each :class:`Scenario` bundles training stages (data + SGD settings), the queries, a tiny MLP
and the task, and knows how to train a run from scratch on a subset of its attributed rows
(:func:`train_run`); :class:`ScenarioRetrain` wraps that as the picklable
``retrain(train_indices, seed) -> (n_query,)`` callable of the evaluation protocols.

* ``digits``: MLP on 8x8 digits trained to (near) convergence.
* ``digits-noisy``: 30% of the training labels re-drawn at random, a few epochs only.
* ``digits-two-stage``: stage 1 on upright digits, stage 2 on digits rotated by 90 degrees;
  attribution targets stage-1 rows, queries are upright test digits.
* ``friedman``: regression on ``make_friedman1``, absolute error as the measurement.
* ``digits-adamw``: the digits MLP trained with AdamW, linear warm-up and cosine decay, to
  (near) convergence.
* ``digits-adamw-noisy``: 30% noisy labels, AdamW with warm-up + cosine over 3 epochs only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits, make_friedman1
from torch import nn

from source_proj.errors import InputError
from source_proj.evaluation.training import AdamWSettings, TrainSettings, train
from source_proj.gradients.tasks import ClassificationTask, RegressionTask, Task
from source_proj.trajectory.checkpoints import Checkpoint, Trajectory

SCENARIOS = ("digits", "digits-noisy", "digits-two-stage", "friedman", "digits-adamw", "digits-adamw-noisy")


@dataclass(frozen=True)
class Stage:
    """One training stage.

    Attributes:
        label: the stage label recorded in the checkpoints.
        inputs: (n, d) float32 features.
        targets: (n,) int64 classes or (n, 1) float32 regression targets.
        settings: SGD or AdamW settings (epochs, batch size, learning rate, momentum or
            betas, weight decay, checkpoints per epoch); ``seed`` is replaced per run.
        checkpoint_stride: keep every j-th checkpoint for attribution (the dropped ones'
            steps are merged into the next kept one); 1 keeps all.
    """

    label: int
    inputs: np.ndarray
    targets: np.ndarray
    settings: TrainSettings | AdamWSettings
    checkpoint_stride: int = 1


@dataclass(frozen=True)
class Scenario:
    """A training setup whose runs are attributed and retrained.

    Attributes:
        name: one of :data:`SCENARIOS` (or a custom label).
        kind: "classification" or "regression".
        stages: the stages in training order.
        attributed_stage: index into ``stages`` of the stage whose rows are attributed
            (and subsampled by the LDS); other stages always train on all their rows.
        query_inputs: (n_query, d) float32; query_targets: (n_query,) or (n_query, 1).
        hidden: width of the MLP's hidden layer.
    """

    name: str
    kind: str
    stages: tuple[Stage, ...]
    attributed_stage: int
    query_inputs: np.ndarray
    query_targets: np.ndarray
    hidden: int = 32

    @property
    def attributed(self) -> Stage:
        """The stage whose rows are attributed."""
        return self.stages[self.attributed_stage]

    @property
    def num_train(self) -> int:
        """N, the number of attributed rows."""
        return int(self.attributed.targets.shape[0])

    @property
    def num_outputs(self) -> int:
        """C, the model's output width."""
        if self.kind == "regression":
            return 1
        return int(max(int(s.targets.max()) for s in self.stages) + 1)

    def task(self) -> Task:
        """The training loss and measurement (margin or absolute error)."""
        return ClassificationTask() if self.kind == "classification" else RegressionTask()

    def model(self) -> nn.Module:
        """A fresh MLP d -> hidden -> C (initialised from torch's global generator)."""
        d = self.query_inputs.shape[1]
        return nn.Sequential(nn.Linear(d, self.hidden), nn.ReLU(), nn.Linear(self.hidden, self.num_outputs))


def coarsen(checkpoints: list[Checkpoint], stride: int) -> list[Checkpoint]:
    """Keep every ``stride``-th checkpoint (and the last), merging the dropped ones' steps and
    learning rates into the next kept checkpoint, so the trajectory still covers every step."""
    kept: list[Checkpoint] = []
    pending: list[Checkpoint] = []
    for i, ckpt in enumerate(checkpoints):
        pending.append(ckpt)
        if (i + 1) % stride == 0 or i == len(checkpoints) - 1:
            rates = np.concatenate([np.broadcast_to(np.asarray(c.lr, float), (c.steps,)) for c in pending])
            lr = float(rates[0]) if np.all(rates == rates[0]) else tuple(rates.tolist())
            kept.append(dataclasses.replace(ckpt, steps=int(rates.size), lr=lr))
            pending = []
    return kept


def train_run(scenario: Scenario, indices: np.ndarray, seed: int) -> tuple[nn.Module, Trajectory]:
    """Train a fresh model: the attributed stage on rows ``indices``, other stages on all rows.

    The seed sets the initialisation and every stage's batch order. Returns the trained
    model (eval mode) and its trajectory (in-memory checkpoints, coarsened per stage).
    """
    torch.manual_seed(seed)
    model = scenario.model()
    task = scenario.task()
    checkpoints: list[Checkpoint] = []
    for s, stage in enumerate(scenario.stages):
        rows = np.asarray(indices) if s == scenario.attributed_stage else np.arange(stage.targets.shape[0])
        settings = dataclasses.replace(stage.settings, seed=seed * len(scenario.stages) + s)
        raw = train(
            model,
            task,
            torch.from_numpy(stage.inputs[rows]),
            torch.from_numpy(stage.targets[rows]),
            settings,
            stage=stage.label,
        )
        checkpoints += coarsen(raw, stage.checkpoint_stride)
    return model, scenario.stages[-1].settings.trajectory(checkpoints)


def measure(scenario: Scenario, model: nn.Module) -> np.ndarray:
    """(n_query,) float64 measurements of the queries under ``model``."""
    with torch.no_grad():
        outputs = model(torch.from_numpy(scenario.query_inputs))
        values = scenario.task().measurement(outputs, torch.from_numpy(scenario.query_targets))
    return values.double().numpy()


@dataclass(frozen=True)
class ScenarioRetrain:
    """Picklable ``retrain(train_indices, seed) -> (n_query,)`` for a scenario."""

    scenario: Scenario

    def __call__(self, indices: np.ndarray, seed: int) -> np.ndarray:
        model, _ = train_run(self.scenario, indices, seed)
        return measure(self.scenario, model)


def _digits(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled digits, pixels standardised with the whole set's mean and std (constant
    pixels stay 0)."""
    data = load_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))
    x = data.data[order]
    x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
    return x.astype(np.float32), data.target[order].astype(np.int64)


def _rotate(images: np.ndarray) -> np.ndarray:
    return np.rot90(images.reshape(-1, 8, 8), k=1, axes=(1, 2)).reshape(-1, 64).copy()


def _noisy_labels(labels: np.ndarray, noise: float, seed: int) -> np.ndarray:
    """``labels`` with a fraction ``noise`` of them re-drawn uniformly from the 10 classes."""
    rng = np.random.default_rng([seed, 1])
    out = labels.copy()
    redraw = rng.random(len(out)) < noise
    out[redraw] = rng.integers(0, 10, size=int(redraw.sum()))
    return out


_CONVERGED = TrainSettings(epochs=30, batch_size=32, lr=0.05, momentum=0.9, weight_decay=1e-3)


def _one_stage_digits(
    name: str, settings: TrainSettings | AdamWSettings, num_train: int, num_queries: int, seed: int,
    noise: float = 0.0, checkpoint_stride: int = 1,
) -> Scenario:
    """A single-stage digits scenario: the first ``num_train`` rows (a fraction ``noise`` of
    their labels re-drawn) trained with ``settings``, the next ``num_queries`` as queries."""
    x, y = _digits(seed)
    labels = _noisy_labels(y[:num_train], noise, seed) if noise > 0 else y[:num_train]
    stage = Stage(0, x[:num_train], labels, settings, checkpoint_stride=checkpoint_stride)
    q = slice(num_train, num_train + num_queries)
    return Scenario(name, "classification", (stage,), 0, x[q], y[q])


def digits(num_train: int = 800, num_queries: int = 100, seed: int = 0) -> Scenario:
    """(a) MLP on digits trained to near convergence."""
    return _one_stage_digits("digits", _CONVERGED, num_train, num_queries, seed, checkpoint_stride=2)


def digits_noisy(num_train: int = 800, num_queries: int = 100, noise: float = 0.3, seed: int = 0) -> Scenario:
    """(b) ``noise`` of the training labels re-drawn uniformly, 3 epochs (not converged)."""
    settings = dataclasses.replace(_CONVERGED, epochs=3, checkpoints_per_epoch=4)
    return _one_stage_digits("digits-noisy", settings, num_train, num_queries, seed, noise=noise)


def digits_two_stage(
    num_stage1: int = 600, num_stage2: int = 300, num_queries: int = 100, seed: int = 0
) -> Scenario:
    """(c) stage 1 on upright digits, stage 2 on rotated ones; attribute stage-1 rows."""
    x, y = _digits(seed)
    first = Stage(0, x[:num_stage1], y[:num_stage1], dataclasses.replace(_CONVERGED, epochs=15))
    rows2 = slice(num_stage1, num_stage1 + num_stage2)
    second = Stage(1, _rotate(x[rows2]), y[rows2], dataclasses.replace(_CONVERGED, epochs=5, lr=0.01))
    q = slice(num_stage1 + num_stage2, num_stage1 + num_stage2 + num_queries)
    return Scenario("digits-two-stage", "classification", (first, second), 0, x[q], y[q])


def friedman(num_train: int = 600, num_queries: int = 100, seed: int = 0) -> Scenario:
    """(d) regression on make_friedman1 (10 features, noise 1), standardised; absolute error."""
    x, y = make_friedman1(n_samples=num_train + num_queries, n_features=10, noise=1.0, random_state=seed)
    x = (x - x[:num_train].mean(0)) / x[:num_train].std(0)
    y = (y - y[:num_train].mean()) / y[:num_train].std()
    x, y = x.astype(np.float32), y.astype(np.float32)[:, None]
    settings = TrainSettings(epochs=40, batch_size=32, lr=0.01, momentum=0.9, weight_decay=1e-3)
    stage = Stage(0, x[:num_train], y[:num_train], settings, checkpoint_stride=2)
    return Scenario("friedman", "regression", (stage,), 0, x[num_train:], y[num_train:])


_ADAMW = AdamWSettings(epochs=30, batch_size=32, lr=3e-3, weight_decay=1e-2, warmup_fraction=0.1)


def digits_adamw(num_train: int = 800, num_queries: int = 100, seed: int = 0) -> Scenario:
    """(e) the digits MLP trained with AdamW (warm-up + cosine) to near convergence."""
    return _one_stage_digits("digits-adamw", _ADAMW, num_train, num_queries, seed, checkpoint_stride=2)


def digits_adamw_noisy(num_train: int = 800, num_queries: int = 100, noise: float = 0.3, seed: int = 0) -> Scenario:
    """(f) ``noise`` of the labels re-drawn, AdamW (warm-up + cosine) over 3 epochs."""
    settings = dataclasses.replace(_ADAMW, epochs=3, checkpoints_per_epoch=4)
    return _one_stage_digits("digits-adamw-noisy", settings, num_train, num_queries, seed, noise=noise)


def build(name: str) -> Scenario:
    """The scenario called ``name`` (one of :data:`SCENARIOS`) with its default sizes."""
    makers: dict[str, Callable[[], Scenario]] = {
        "digits": digits,
        "digits-noisy": digits_noisy,
        "digits-two-stage": digits_two_stage,
        "friedman": friedman,
        "digits-adamw": digits_adamw,
        "digits-adamw-noisy": digits_adamw_noisy,
    }
    if name not in makers:
        raise InputError(f"unknown scenario {name!r}; expected one of {SCENARIOS}")
    return makers[name]()
