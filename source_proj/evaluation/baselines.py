"""Attribution estimators on one :class:`ProjectedRun`, all in the same projected space.

Every function returns scores (n_query, N) float64 in the library's convention: ``> 0`` means
including the training row raises the query's measurement. With g_q(c) the projected
measurement gradient of query q at checkpoint c, g_m(c) the projected loss gradient of
training row m, T the final checkpoint, lambda the weight decay and N the attributed rows:

* SOURCE: the core's formula (``curvature`` / ``features``) evaluated on the cached gradients
  and Hessians, for any :class:`~source_proj.config.SourceConfig`.
* TracIn (TracInCP): -sum_c (eta-sum of checkpoint c / N) <g_q(c), g_m(c)> over the
  checkpoints of the attributed stage (the steps in which the rows were trained on).
* Influence functions at the final checkpoint, damped:
  -(1 / N_all) g_q(T)^T (H_T + (lambda + delta) I)^{-1} g_m(T), with H_T the Gauss-Newton
  Hessian over all training rows (exact, or sampled for a run projected with sampled
  curvature only: ``ProjectedRun.final_curvature``) and delta = ``damping`` x the mean
  eigenvalue of H_T + lambda I.
* TRAK's single-model estimator: phi_q^T (Phi^T Phi)^{-1} phi_m (1 - p_m), with phi the
  projected gradient of the margin (the measurement), Phi stacking phi over all training
  rows and (1 - p_m) the out-to-loss weight. Since the cross-entropy gradient is exactly
  -(1 - p_m) phi_m, this equals -g_q(T)^T (Phi^T Phi)^+ g_m(T), the form computed here (it
  also covers regression, where the loss gradient is 2 (f - y) times the output gradient).
  The pseudo-inverse stands in for the inverse when Phi^T Phi is singular (N_all < k).
* Representation similarity: cosine of penultimate-layer activations at the final model.

Self-influence variants (N,) (curation: predicted rise of a row's own loss if removed):
SOURCE's (as ``SourceAttributor.self_influence``), TracIn's sum_c (eta-sum / N) |g_m(c)|^2
and the influence function's (1 / N_all) g_m(T)^T (H_T + (lambda + delta) I)^{-1} g_m(T).

Ensembles average the scores of independently trained runs (:func:`ensemble`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from source_proj.config import SourceConfig
from source_proj.curvature.spectra import segment_spectra, transport_operators
from source_proj.errors import InputError
from source_proj.evaluation.projected_run import ProjectedRun
from source_proj.features.query_forms import QueryForm, query_form
from source_proj.features.rows import row_dot, segment_features
from source_proj.trajectory.checkpoints import Segment


def _source_train(
    run: ProjectedRun, config: SourceConfig
) -> tuple[ProjectedRun, tuple[Segment, ...], QueryForm, torch.Tensor, torch.Tensor]:
    """(run at ``config.proj_dim``, segments, query form, per-segment mean training gradients
    (N, L, k) float64, training features (N, D)) of SOURCE with ``config`` on ``run``."""
    structure = run.structure if config.proj_structure == "auto" else config.proj_structure  # no model to resolve it
    if (config.seed, config.proj_kind, structure) != (run.seed, run.kind, run.structure):
        raise InputError(
            f"config projects with seed {config.seed} ({config.proj_kind}, {structure}) but the run "
            f"was projected with seed {run.seed} ({run.kind}, {run.structure})"
        )
    if run.structure != "dense" and (config.proj_dim, config.kronecker_terms) != (run.budget, run.kronecker_terms):
        raise InputError(
            f"a {run.structure} run (k = {run.budget}, {run.kronecker_terms} terms) cannot be scored at k = "
            f"{config.proj_dim} with {config.kronecker_terms} terms: project it again"
        )
    curvature = config.resolved_curvature(run.default_curvature)
    if curvature not in run.hessians:
        raise InputError(f"the run has no {curvature!r} curvature; it has {sorted(run.hessians)}")
    if config.curvature_examples is not None:
        raise InputError("cached runs hold Hessians over all rows; set curvature_examples=None")
    if run.structure == "dense" and config.proj_dim != run.dim:
        run = run.truncate(config.proj_dim)
    trajectory = run.trajectory
    segments = trajectory.segments(config.num_segments, config.momentum_factor, config.time_scale)
    # "auto" as the run's model resolved it; an explicit value does not depend on the model.
    blocks = run.curvature_blocks if config.curvature_blocks == "auto" else config.resolved_curvature_blocks(
        run.structure, embeddings=False)
    groups = run.layer_groups if blocks == "layer" else None
    spectra = segment_spectra(segments, run.hessians[curvature], run.decays, groups=groups)
    form = query_form(config.resolved_query_mode(len(trajectory.stages)), segments)
    operators = transport_operators(spectra, form.carried, groups)
    size = run.stage_sizes[run.attributed_stage]
    weights = torch.tensor(
        [1.0 / size if seg.stage == run.attributed_stage else 0.0 for seg in segments], dtype=torch.float64
    )
    seg_grads = torch.stack(
        [run.train_grads[list(seg.checkpoints)].double().mean(dim=0) for seg in segments], dim=1
    )
    train = form.combine(segment_features(seg_grads, operators, weights))
    return run, segments, form, seg_grads, train


def source_scores(run: ProjectedRun, config: SourceConfig) -> torch.Tensor:
    """SOURCE scores (n_query, N) float64 with ``config``'s estimator settings.

    Uses ``num_segments``, ``momentum_factor``, ``time_scale``, ``curvature``, ``curvature_blocks`` ("auto": the
    run's), ``query_mode``,
    ``proj_dim`` (<= the run's; smaller dims use :meth:`ProjectedRun.truncate`), and checks
    that ``seed``, ``proj_kind`` and ``proj_structure`` ("auto": the run's) (and for factored runs ``proj_dim`` and
    ``kronecker_terms``) are the run's. Equals ``SourceAttributor(config)``'s
    scores on the same run up to float32 round-off.
    """
    run, segments, form, _, train = _source_train(run, config)
    groups = form.query_checkpoints(segments, run.query_grads.shape[0])
    query = torch.cat([-run.query_grads[list(group)].double().mean(dim=0) for group in groups], dim=1)
    return query @ train.double().T


def source_self_influence(run: ProjectedRun, config: SourceConfig) -> torch.Tensor:
    """SOURCE self-influence (N,) float64 of the attributed rows, as
    ``SourceAttributor.self_influence()``: minus each row's score on its own loss (its loss
    gradient at the final checkpoint in "final" query mode, its per-segment mean loss
    gradients in "segment" mode)."""
    run, _, form, seg_grads, train = _source_train(run, config)
    own = form.own_gradients(run.train_grads[-1].double(), seg_grads)
    return row_dot(own, train)


def _tracin_weights(run: ProjectedRun) -> tuple[list[int], torch.Tensor]:
    """The attributed stage's checkpoints and their weights (eta-sum / N), float64."""
    checkpoints = run.trajectory.checkpoints
    chosen = [c for c, ckpt in enumerate(checkpoints) if ckpt.stage == run.attributed_stage]
    return chosen, torch.tensor([checkpoints[c].lr_sum() for c in chosen], dtype=torch.float64) / run.num_train


def tracin_scores(run: ProjectedRun) -> torch.Tensor:
    """TracInCP scores (n_query, N) float64 over the attributed stage's checkpoints."""
    chosen, weights = _tracin_weights(run)
    return -torch.einsum(
        "c,cqk,cnk->qn", weights, run.query_grads[chosen].double(), run.train_grads[chosen].double()
    )


def _damped_inverse(run: ProjectedRun, damping: float) -> torch.Tensor:
    """(H_T + (lambda + delta) I)^{-1}, (k, k) float64, delta = damping x mean eigenvalue."""
    if not damping >= 0:
        raise InputError(f"damping must be >= 0, got {damping!r}")
    hessian = run.final_hessian.double() + run.decays[-1] * torch.eye(run.dim, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(0.5 * (hessian + hessian.T))
    evals = evals.clamp_min(0.0)
    return (evecs / (evals + damping * evals.mean())) @ evecs.T


def influence_scores(run: ProjectedRun, damping: float = 1e-3) -> torch.Tensor:
    """Damped influence-function scores (n_query, N) float64 at the final checkpoint.

    ``damping`` is relative: delta = damping x mean eigenvalue of H_T + lambda I (>= 0).
    """
    total = sum(run.stage_sizes.values())
    return -(run.query_grads[-1].double() @ _damped_inverse(run, damping) @ run.train_grads[-1].double().T) / total


def influence_self_influence(run: ProjectedRun, damping: float = 1e-3) -> torch.Tensor:
    """Influence-function self-influence (N,) float64: (1 / N_all) g_m(T)^T (H_T + (lambda +
    delta) I)^{-1} g_m(T), the predicted rise of each row's own final loss if removed."""
    grads = run.train_grads[-1].double()
    total = sum(run.stage_sizes.values())
    return row_dot(grads @ _damped_inverse(run, damping), grads) / total


def tracin_self_influence(run: ProjectedRun) -> torch.Tensor:
    """TracIn self-influence (N,) float64: sum_c (eta-sum of c / N) |g_m(c)|^2 over the
    attributed stage's checkpoints (minus TracIn's score of the row on its own loss)."""
    chosen, weights = _tracin_weights(run)
    return torch.einsum("c,cn->n", weights, run.train_grads[chosen].double().square().sum(dim=-1))


def trak_scores(run: ProjectedRun) -> torch.Tensor:
    """TRAK single-model scores (n_query, N) float64 (see the module docstring)."""
    phi = run.final_output_grads.double()
    kernel_inverse = torch.linalg.pinv(phi.T @ phi, hermitian=True)
    return -(run.query_grads[-1].double() @ kernel_inverse @ run.train_grads[-1].double().T)


def penultimate_features(model: nn.Sequential, state: dict, inputs: torch.Tensor) -> torch.Tensor:
    """Activations (B, h) of all layers but the last of a Sequential ``model`` under ``state``."""
    if not isinstance(model, nn.Sequential) or len(model) < 2:
        raise TypeError("penultimate_features needs an nn.Sequential with at least two layers")
    body = model[:-1]
    names = set(body.state_dict())
    with torch.no_grad():
        return functional_call(body, {k: v for k, v in state.items() if k in names}, (inputs,))


def representation_similarity(query_features: torch.Tensor, train_features: torch.Tensor) -> torch.Tensor:
    """Cosine similarities (n_query, N) float64 of query (n_query, h) and training (N, h) features."""
    q = torch.nn.functional.normalize(query_features.double(), dim=1)
    t = torch.nn.functional.normalize(train_features.double(), dim=1)
    return q @ t.T


def ensemble(scores: Sequence[torch.Tensor | np.ndarray]) -> np.ndarray:
    """Mean (n_query, N) float64 of score matrices of independently trained runs."""
    if not scores:
        raise InputError("ensemble of no score matrices")
    shapes = {tuple(np.shape(s)) for s in scores}
    if len(shapes) != 1:
        raise InputError(f"score matrices of different shapes {sorted(shapes)}")
    return np.mean([np.asarray(s, dtype=np.float64) for s in scores], axis=0)
