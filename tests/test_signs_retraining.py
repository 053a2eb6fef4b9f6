"""Signs, checked by retraining: removing a query's top proponents lowers its margin more than
removing as many random rows, and removing its top opponents raises it. For an SGD-trained
model and for an AdamW-trained one (warm-up + cosine; preconditioned SOURCE)."""

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from source_proj.attributor import SourceAttributor
from source_proj.cli.demo import digits_data, digits_model
from source_proj.evaluation.training import AdamWSettings, TrainSettings, train
from source_proj.gradients.tasks import ClassificationTask


@dataclass(frozen=True)
class Case:
    settings: TrainSettings | AdamWSettings
    rows: int
    queries: int
    removed: int
    random_draws: int
    attributor: dict = field(default_factory=dict)


CASES = {
    "sgd": Case(TrainSettings(epochs=8, batch_size=32, lr=0.05, momentum=0.9, weight_decay=5e-4, checkpoints_per_epoch=1),
                rows=400, queries=6, removed=30, random_draws=2, attributor={"proj_dim": 256}),
    "adamw": Case(AdamWSettings(epochs=6, batch_size=32, lr=5e-3, weight_decay=1e-2, warmup_fraction=0.1, checkpoints_per_epoch=1),
                  rows=300, queries=5, removed=25, random_draws=1, attributor={"proj_dim": 128, "curvature_examples": 150}),
}


def margins_after_training(case, x, y, queries, keep):
    model = digits_model(hidden=16, seed=0)
    train(model, ClassificationTask(), x[keep], y[keep], case.settings)
    with torch.no_grad():
        return ClassificationTask().measurement(model(queries[0]), queries[1]).numpy()


@pytest.mark.parametrize("name", sorted(CASES))
def test_removing_top_proponents_lowers_the_margin_more_than_random_removal(name):
    case = CASES[name]
    n = case.rows
    (x, y), (xt, yt) = digits_data()
    x, y = x[:n], y[:n]
    model = digits_model(hidden=16, seed=0)
    traj = case.settings.trajectory(train(model, ClassificationTask(), x, y, case.settings))
    with torch.no_grad():
        correct = (model(xt).argmax(1) == yt).nonzero()[: case.queries, 0]
    queries = (xt[correct], yt[correct])
    scores = SourceAttributor(model, "classification", traj, progress=False, **case.attributor).fit((x, y)).score(queries)
    base = margins_after_training(case, x, y, queries, torch.arange(n))
    k, rng = case.removed, np.random.default_rng(0)
    top_drop, random_drop, opp_drop = [], [], []
    for q in range(len(correct)):
        for order, out in ((torch.argsort(scores[q], descending=True), top_drop), (torch.argsort(scores[q]), opp_drop)):
            keep = torch.ones(n, dtype=torch.bool)
            keep[order[:k]] = False
            out.append(base[q] - margins_after_training(case, x, y, queries, keep)[q])
        draws = []
        for _ in range(case.random_draws):
            keep = torch.ones(n, dtype=torch.bool)
            keep[torch.from_numpy(rng.choice(n, k, replace=False))] = False
            draws.append(base[q] - margins_after_training(case, x, y, queries, keep)[q])
        random_drop.append(np.mean(draws))
    top_drop, random_drop, opp_drop = map(np.asarray, (top_drop, random_drop, opp_drop))
    assert (top_drop > random_drop).sum() >= len(correct) - 1, (top_drop, random_drop)
    assert top_drop.mean() > random_drop.mean() + 0.5, (top_drop, random_drop)
    assert opp_drop.mean() < random_drop.mean(), (opp_drop, random_drop)
