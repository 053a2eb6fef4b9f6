"""Signs on a tiny language model, checked by retraining: removing the training sequences
predicted to lower a held-out sequence's loss the most raises that loss after retraining more
than removing as many random sequences does."""

import numpy as np
import pytest
import torch
from lm_helpers import as_columns, random_rows, tiny_gpt2, train_lm

from source_proj.attributor import SourceAttributor
from source_proj.gradients.causal_lm import CausalLMTask
from source_proj.gradients.data import split_columns

pytest.importorskip("transformers")
N, K, EPOCHS = 60, 10, 6
TASK = CausalLMTask(reduction="mean", measure="loss")


def query_losses(rows, queries, keep, seed):
    model = tiny_gpt2(seed=seed)
    train_lm(model, [rows[i] for i in keep], epochs=EPOCHS, lr=0.5, seed=seed, task=TASK)
    inputs, targets = split_columns(as_columns(queries))
    with torch.no_grad():
        return TASK.measurement(model(**inputs).logits, targets).numpy()


@pytest.mark.slow  # 2-5 min on 2 cores: 13 retrainings per seed
@pytest.mark.parametrize("seed", [0, 1])
def test_removing_rows_that_lower_a_held_out_loss_raises_it_after_retraining(seed):
    rows = random_rows(N + 4, 10, (8, 8), seed=10 + seed, masked=False)
    rows, queries = rows[:N], rows[N:]  # held-out noisy copies of the training motifs
    model = tiny_gpt2(seed=seed)
    traj = train_lm(model, rows, epochs=EPOCHS, lr=0.5, seed=seed, task=TASK)
    scores = SourceAttributor(model, TASK, traj, proj_dim=128, progress=False).fit(as_columns(rows)).score(as_columns(queries))
    everything = np.arange(N)
    base = query_losses(rows, queries, everything, seed)
    rng = np.random.default_rng(seed)
    top_rise, random_rise = [], []
    for q in range(len(queries)):
        helpers = torch.argsort(scores[q])[:K].numpy()  # most negative: including them lowers the loss
        top_rise.append(query_losses(rows, queries, np.setdiff1d(everything, helpers), seed)[q] - base[q])
        random_rise.append(np.mean([
            query_losses(rows, queries, np.setdiff1d(everything, rng.choice(N, K, replace=False)), seed)[q] - base[q]
            for _ in range(2)
        ]))
    top_rise, random_rise = np.asarray(top_rise), np.asarray(random_rise)
    assert (top_rise > random_rise).sum() >= 3, (top_rise, random_rise)
    assert top_rise.mean() > random_rise.mean() + 0.05, (top_rise, random_rise)
