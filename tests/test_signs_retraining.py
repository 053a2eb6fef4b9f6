"""Signs, checked by retraining: removing a query's top proponents lowers its margin more than
removing as many random rows, and removing its top opponents raises it."""

import numpy as np
import torch

from source_proj.attributor import SourceAttributor
from source_proj.cli.demo import digits_data, digits_model
from source_proj.gradients.tasks import ClassificationTask
from source_proj.trajectory.training import TrainSettings, train_sgd

SETTINGS = TrainSettings(epochs=8, batch_size=32, lr=0.05, momentum=0.9, weight_decay=5e-4, checkpoints_per_epoch=1)


def margins_after_training(x, y, queries, keep):
    model = digits_model(hidden=16, seed=0)
    train_sgd(model, ClassificationTask(), x[keep], y[keep], SETTINGS)
    with torch.no_grad():
        return ClassificationTask().measurement(model(queries[0]), queries[1]).numpy()


def test_removing_top_proponents_lowers_the_margin_more_than_random_removal():
    (x, y), (xt, yt) = digits_data()
    x, y = x[:400], y[:400]
    model = digits_model(hidden=16, seed=0)
    traj = SETTINGS.trajectory(train_sgd(model, ClassificationTask(), x, y, SETTINGS))
    with torch.no_grad():
        correct = (model(xt).argmax(1) == yt).nonzero()[:6, 0]
    queries = (xt[correct], yt[correct])
    scores = SourceAttributor(model, "classification", traj, proj_dim=256, progress=False).fit((x, y)).score(queries)
    base = margins_after_training(x, y, queries, torch.arange(400))
    k, rng = 30, np.random.default_rng(0)
    top_drop, random_drop, opp_drop = [], [], []
    for q in range(len(correct)):
        for order, out in ((torch.argsort(scores[q], descending=True), top_drop), (torch.argsort(scores[q]), opp_drop)):
            keep = torch.ones(400, dtype=torch.bool)
            keep[order[:k]] = False
            out.append(base[q] - margins_after_training(x, y, queries, keep)[q])
        draws = []
        for _ in range(2):
            keep = torch.ones(400, dtype=torch.bool)
            keep[torch.from_numpy(rng.choice(400, k, replace=False))] = False
            draws.append(base[q] - margins_after_training(x, y, queries, keep)[q])
        random_drop.append(np.mean(draws))
    top_drop, random_drop, opp_drop = map(np.asarray, (top_drop, random_drop, opp_drop))
    assert (top_drop > random_drop).sum() >= 5, (top_drop, random_drop)
    assert top_drop.mean() > random_drop.mean() + 0.5, (top_drop, random_drop)
    assert opp_drop.mean() < random_drop.mean(), (opp_drop, random_drop)
