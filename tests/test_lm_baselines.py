"""Baselines on language models: a tiny GPT-2 (from a config) with dict rows, projected with
sampled curvature only (the exact path made to raise), against gradients taken directly."""

import numpy as np
import pytest
import torch
from lm_helpers import (
    _with_state,
    as_columns,
    oracle_gn_hessian,
    oracle_measure,
    oracle_row_grads,
    oracle_token_loss,
    random_rows,
    tiny_gpt2,
    train_lm,
)
from tiny_models import identity_projection, rel_err

from source_proj.attributor import SourceAttributor
from source_proj.evaluation.baselines import tracin_scores
from source_proj.evaluation.projected_run import project_run
from source_proj.gradients.causal_lm import CausalLMTask

pytest.importorskip("transformers")


def _no_exact_curvature(*_args, **_kwargs):
    raise AssertionError("exact curvature was formed, but only sampled curvature was asked for")


def test_sampled_only_run_forms_no_exact_curvature_and_tracin_equals_direct_gradients(monkeypatch):
    monkeypatch.setattr("source_proj.projection.projected.project", identity_projection)  # k = p: no JL error
    monkeypatch.setattr(CausalLMTask, "hessian_factor", _no_exact_curvature)
    model = tiny_gpt2(vocab=6, positions=8, width=4)
    train, queries = random_rows(6, 6, (3, 6), seed=0), random_rows(3, 6, (3, 6), seed=1)
    task = CausalLMTask(reduction="sum")
    traj = train_lm(model, train, task=task, epochs=3)  # project_run's engines cut 3 segments
    p = sum(q.numel() for q in model.parameters())
    run = project_run(model, task, traj, {0: as_columns(train)}, 0, as_columns(queries), p, structure="dense",
                      curvature_modes=("sampled",), progress=False)
    assert set(run.hessians) == {"sampled"} and run.final_curvature == "sampled"
    # One stage: the pooled final Hessian is the last checkpoint's sampled one, not recomputed.
    assert torch.equal(run.final_hessian, run.hessians["sampled"][-1])
    # TracIn = -sum_c (eta-sum_c / N) <grad log p(query), grad loss(row)>, each row unpadded.
    expected = 0.0
    for ckpt in traj.checkpoints:
        state = ckpt.load()
        g_train = oracle_row_grads(model, state, train, lambda z, r: oracle_token_loss(z, r, "sum"))
        g_query = oracle_row_grads(model, state, queries, lambda z, r: oracle_measure(z, r, "log_prob", "sum"))
        expected = expected - ckpt.lr_sum() / len(train) * (g_query @ g_train.T)
    expected = expected.numpy()
    assert np.abs(expected).max() > 1e-2
    assert rel_err(tracin_scores(run).numpy(), expected) < 1e-5


def test_checkpoint_hessian_takes_lm_columns(monkeypatch):
    monkeypatch.setattr("source_proj.projection.projected.project", identity_projection)
    model = tiny_gpt2(vocab=6, positions=8, width=4)
    rows = random_rows(4, 6, (3, 6), seed=2)
    task = CausalLMTask(reduction="sum")
    traj = train_lm(model, rows, epochs=1, task=task)
    p = sum(q.numel() for q in model.parameters())
    att = SourceAttributor(model, task, traj, proj_dim=p, num_segments=1, curvature="exact", progress=False,
                           proj_structure="dense")
    # Rows of different lengths in one dict of columns: padded by the library, never by the oracle.
    got = att.checkpoint_hessian(0, as_columns(rows))
    want = oracle_gn_hessian(_with_state(model, traj.checkpoints[0].load()), rows, "sum")
    assert float(want.abs().max()) > 1e-2
    assert rel_err(got.numpy(), want.numpy()) < 1e-5
