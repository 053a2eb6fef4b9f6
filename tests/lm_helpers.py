"""Tiny GPT-2 language models built from configs (nothing downloaded), their data, and a
dense oracle of the SOURCE formulas for them with token losses from ``F.cross_entropy``."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from tiny_models import dense_scores_from_parts

from source_proj.evaluation.training import TrainSettings, train_sgd
from source_proj.gradients.causal_lm import CausalLMTask
from source_proj.gradients.data import split_columns
from source_proj.trajectory.checkpoints import Trajectory


def tiny_gpt2(vocab: int = 10, positions: int = 16, width: int = 8, layers: int = 1, seed: int = 0,
              attn: str = "eager"):
    """A GPT-2 LM (head tied to the embedding) with no dropout; ~1k parameters by default."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab, n_positions=positions, n_embd=width, n_layer=layers, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        attn_implementation=attn,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def random_rows(n: int, vocab: int, lengths: tuple[int, int], seed: int, masked: bool = True) -> list[dict]:
    """Dict rows of varied lengths drawn from a few repeated motifs (so the model can learn);
    with ``masked``, every third row has its first two labels set to -100 (a prompt)."""
    gen = torch.Generator().manual_seed(seed)
    motifs = torch.randint(0, vocab, (3, lengths[1]), generator=gen)
    rows = []
    for i in range(n):
        length = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=gen))
        ids = motifs[i % 3, :length].clone()
        flips = torch.rand(length, generator=gen) < 0.2
        ids[flips] = torch.randint(0, vocab, (int(flips.sum()),), generator=gen)
        labels = ids.clone()
        if masked and i % 3 == 2:
            labels[:2] = -100
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return rows


def as_columns(rows: list[dict]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in rows[0]}


def padded_batch(rows: list[dict], extra: int, junk_label: int = 7) -> dict[str, torch.Tensor]:
    """``rows`` right-padded to ``extra`` positions past the longest: input_ids, attention_mask
    and labels (B, T), with ``junk_label`` at padded positions (the mask must hide them)."""
    width = max(len(r["input_ids"]) for r in rows) + extra
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), junk_label)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], mask[i, :n], labels[i, :n] = torch.tensor(r["input_ids"]), 1, torch.tensor(r["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train_lm(model, rows: list[dict], epochs: int = 3, lr: float = 0.5, batch_size: int = 4,
             weight_decay: float = 1e-3, seed: int = 0, task: CausalLMTask | None = None) -> Trajectory:
    """Plain SGD on the rows (padded once to the longest), one checkpoint per epoch."""
    inputs, targets = split_columns(as_columns(rows))
    settings = TrainSettings(epochs=epochs, batch_size=batch_size, lr=lr, momentum=0.0,
                             weight_decay=weight_decay, checkpoints_per_epoch=1, seed=seed)
    ckpts = train_sgd(model, task or CausalLMTask(reduction="sum"), inputs, targets, settings)
    return settings.trajectory(ckpts)


# ------------------------------------------------------------------ dense oracle
def _logits(m, row: dict) -> torch.Tensor:
    """(1, L, V) logits of one unpadded row from the model called as usual."""
    return m(input_ids=torch.tensor(row["input_ids"])[None]).logits


def oracle_token_loss(logits: torch.Tensor, row: dict, reduction: str) -> torch.Tensor:
    """Next-token cross-entropy of one row from F.cross_entropy (ignore_index=-100)."""
    labels = torch.tensor(row["labels"])[1:]
    total = F.cross_entropy(logits[0, :-1], labels, ignore_index=-100, reduction="sum")
    return total / (labels != -100).sum().clamp_min(1) if reduction == "mean" else total


def oracle_measure(logits: torch.Tensor, row: dict, measure: str, reduction: str) -> torch.Tensor:
    labels = torch.tensor(row["labels"])[1:]
    z = logits[0, :-1]
    if measure == "loss":
        return oracle_token_loss(logits, row, reduction)
    if measure == "log_prob":
        return -F.cross_entropy(z, labels, ignore_index=-100, reduction="sum")
    total = 0.0
    for t in range(len(labels)):
        y = int(labels[t])
        if y == -100:
            continue
        others = torch.cat([z[t, :y], z[t, y + 1 :]])
        total = total + z[t, y] - torch.logsumexp(others, 0)
    return total


def _with_state(model, state):
    m = copy.deepcopy(model)
    m.load_state_dict(state)
    return m


def _grad(m, value: torch.Tensor, retain: bool = False) -> torch.Tensor:
    """d value / d parameters of ``m`` (tied tensors once), flattened, float64."""
    grads = torch.autograd.grad(value, list(m.parameters()), retain_graph=retain)
    return torch.cat([g.reshape(-1) for g in grads]).double()


def oracle_gn_hessian(m, rows: list[dict], reduction: str) -> torch.Tensor:
    """Mean over rows of J^T (d^2 loss / d logits^2) J, (p, p) float64, with J from
    per-output autograd and the logit Hessian from autograd of the oracle loss."""
    total = 0.0
    for row in rows:
        logits = _logits(m, row)
        jac = torch.stack([_grad(m, value, retain=True) for value in logits.reshape(-1)])
        out = logits.detach().double()
        hess = torch.autograd.functional.hessian(lambda o: oracle_token_loss(o, row, reduction), out)
        total = total + jac.T @ hess.reshape(jac.shape[0], jac.shape[0]) @ jac
    return total / len(rows)


def oracle_row_grads(model, state, rows: list[dict], fn) -> torch.Tensor:
    """(len(rows), p) float64 gradients of ``fn(logits, row)`` under ``state``, one unpadded
    row at a time by autograd."""
    m = _with_state(model, state)
    return torch.stack([_grad(m, fn(_logits(m, r), r)) for r in rows])


def dense_lm_scores(model, traj: Trajectory, train: list[dict], queries: list[dict], num_segments: int,
                    reduction: str, measure: str) -> np.ndarray:
    """SOURCE scores (Q, N) evaluated densely, without projection, rows unpadded."""

    states = [c.load() for c in traj.checkpoints]
    return dense_scores_from_parts(
        traj, num_segments, None, len(train),
        train_grads=lambda c: oracle_row_grads(
            model, states[c], train, lambda z, r: oracle_token_loss(z, r, reduction)),
        query_grads=lambda c: oracle_row_grads(
            model, states[c], queries, lambda z, r: oracle_measure(z, r, measure, reduction)),
        hessian=lambda c, _stage: oracle_gn_hessian(_with_state(model, states[c]), train, reduction),
        query_mode="segment",
    )
