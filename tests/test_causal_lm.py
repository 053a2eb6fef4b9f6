"""Language models as users train them: a tiny GPT-2 (from a config) with dict rows,
ModelOutput logits, a tied head, padding and -100 labels, against a dense oracle."""

import numpy as np
import pytest
import torch
from lm_helpers import (
    as_columns,
    dense_lm_scores,
    padded_batch,
    random_rows,
    tiny_gpt2,
    train_lm,
)
from tiny_models import identity_projection

from source_proj.attributor import SourceAttributor
from source_proj.gradients.causal_lm import (
    CausalLMTask,
    mask_prompt,
    target_token_labels,
)
from source_proj.gradients.data import as_examples

pytest.importorskip("transformers")


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("reduction,measure", [("sum", "log_prob"), ("mean", "margin")])
def test_lm_scores_equal_dense_formula_with_padding_and_ignored_labels(monkeypatch, reduction, measure):
    monkeypatch.setattr("source_proj.projection.projected.project", identity_projection)
    model = tiny_gpt2(vocab=6, positions=8, width=4)  # p = 308: dense p x p algebra stays cheap
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: attributed once
    train = random_rows(5, 6, (3, 6), seed=0)
    queries = random_rows(3, 6, (3, 6), seed=1)
    task = CausalLMTask(reduction=reduction, measure=measure)
    traj = train_lm(model, train, task=task, epochs=2)
    p = sum(q.numel() for q in model.parameters())
    # chunk_size 3: the library pads within chunks of different lengths; the oracle never pads.
    att = SourceAttributor(model, task, traj, proj_dim=p, num_segments=2, curvature="exact",
                           chunk_size=3, progress=False, proj_structure="dense").fit(as_columns(train))
    got = att.score(as_columns(queries)).numpy()
    dense = dense_lm_scores(model, traj, train, queries, 2, reduction, measure)
    assert np.abs(dense).max() > 1e-3
    assert rel_err(got, dense) < 2e-4


def test_sampled_lm_factor_is_unbiased_for_the_exact_token_hessian():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 4, 3, generator=gen, dtype=torch.float64)
    labels = torch.tensor([[1, -100, 2, 0]])
    for reduction in ("sum", "mean", 2.5):
        task = CausalLMTask(reduction=reduction)
        exact = task.hessian_factor(logits, labels)[0]
        cols, signs = task.sampled_hessian_factor(logits.expand(40000, 4, 3), labels.expand(40000, 4), gen)
        assert signs is None and cols.shape == (40000, 12, 1)
        estimate = cols[..., 0].T @ cols[..., 0] / 40000
        # Position 0 predicts the ignored label, position 3 nothing (the shift): zero blocks.
        target = exact @ exact.T
        assert target[:3].abs().max() == 0 and target[9:].abs().max() == 0 and target[3:9].abs().max() > 0.01
        torch.testing.assert_close(estimate, target, rtol=0, atol=8e-3)
        # ...and the exact factor is the autograd Hessian of the loss w.r.t. the logits.
        hess = torch.autograd.functional.hessian(lambda o: task.loss(o, labels).sum(), logits).reshape(12, 12)
        torch.testing.assert_close(target, hess, rtol=1e-10, atol=1e-12)


def test_sampled_lm_curvature_averages_to_the_exact_gauss_newton():
    model = tiny_gpt2(vocab=6)
    rows = random_rows(8, 6, (4, 6), seed=2)
    traj = train_lm(model, rows, epochs=1)
    kw = dict(proj_dim=12, num_segments=1, progress=False)
    exact = SourceAttributor(model, "causal_lm", traj, curvature="exact", **kw)
    assert SourceAttributor(model, "causal_lm", traj, **kw).curvature == "sampled"  # the LM default
    h_exact = exact.checkpoint_hessian(0, as_examples(as_columns(rows)))
    sampled = SourceAttributor(model, "causal_lm", traj, curvature="sampled", chunk_size=600, **kw)
    # 150 copies of each row = 150 independent pseudo-label draws per position (measured 0.054;
    # 0.127 with 60 copies: the error falls as 1/sqrt(draws)).
    h_sampled = sampled.checkpoint_hessian(0, as_examples(as_columns(rows * 150)))
    assert rel_err(h_sampled.numpy(), h_exact.numpy()) < 0.1


def test_padding_invariance_same_sequence_padded_to_two_lengths():
    model = tiny_gpt2()
    rows = random_rows(5, 10, (3, 7), seed=3)
    traj = train_lm(model, rows, epochs=2)
    features = []
    for extra in (0, 6):
        data = padded_batch(rows, extra)  # junk labels at padding: the mask must hide them
        att = SourceAttributor(model, "causal_lm", traj, proj_dim=32, num_segments=2, progress=False).fit(data)
        features.append((att.train_features, att.self_influence()))
    # float32 features: padded shapes change the rounding of the forward and of the projected
    # Gram matrices, a few ulps of the largest feature (ulp = 2^-23 of it); padding leaking into
    # the loss would change them by orders of magnitude more.
    for padded, unpadded in zip(features[1], features[0]):
        scale = unpadded.abs().max().item()
        torch.testing.assert_close(padded, unpadded, rtol=1e-5, atol=2e-6 * scale)


def test_completion_and_target_token_measurements():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 5, 4, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, 4, (2, 5), generator=gen)
    logp = torch.log_softmax(logits, dim=-1)
    completion = CausalLMTask(measure="log_prob").measurement(logits, mask_prompt(ids, [3, 1]))
    # log p(tokens 3.. | prompt 0..2) of row 0 and of tokens 1.. of row 1 (logits at t predict t + 1).
    expected = [sum(logp[0, t - 1, ids[0, t]] for t in (3, 4)), sum(logp[1, t - 1, ids[1, t]] for t in (1, 2, 3, 4))]
    torch.testing.assert_close(completion, torch.stack(expected))
    margin = CausalLMTask(measure="margin").measurement(logits, target_token_labels(5, [2, 4], [1, 3]))
    z1, z2 = logits[0, 1], logits[1, 3]
    torch.testing.assert_close(margin, torch.stack([z1[1] - torch.logsumexp(z1[[0, 2, 3]], 0),
                                                    z2[3] - torch.logsumexp(z2[[0, 1, 2]], 0)]))
    loss = CausalLMTask(reduction="mean", measure="loss").measurement(logits, ids)
    torch.testing.assert_close(loss, -torch.stack([logp[i, torch.arange(4), ids[i, 1:]].mean() for i in range(2)]))
