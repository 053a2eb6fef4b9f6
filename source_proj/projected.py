"""Projected per-example quantities at one checkpoint: the k-vectors everything else uses.

Each function takes a loaded checkpoint (attributed params and constants), a batch of
examples, and the projection, and returns float32 tensors in the projected space:
gradients of a per-example objective (B, k), and Gauss-Newton factor rows (B, R, k).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from source_proj.gradients import (
    Inputs,
    ModelFunction,
    check_finite,
    factor_objective,
    loss_objective,
    per_example_gradients,
)
from source_proj.projection import ProjectionConfig, project
from source_proj.tasks import Task

CURVATURE_MODES = ("exact", "sampled")


def projected_gradients(
    fn: ModelFunction,
    params: dict,
    consts: dict,
    objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: Inputs,
    targets: torch.Tensor,
    projection: ProjectionConfig,
    where: str,
) -> torch.Tensor:
    """P grad_theta objective(z_i) for each example, (B, k) float32.

    ``objective`` is a per-example function (B, C), (B, ...) -> (B,) such as the task's loss or
    measurement; ``where`` names the checkpoint in errors about NaN/inf.
    """
    grads = per_example_gradients(fn, params, consts, loss_objective(objective), inputs, targets)
    out = project(grads, projection)
    check_finite(out, f"projected gradients at {where}")
    return out


def projected_gn_factors(
    fn: ModelFunction,
    params: dict,
    consts: dict,
    task: Task,
    inputs: Inputs,
    targets: torch.Tensor,
    projection: ProjectionConfig,
    mode: str,
    generator: torch.Generator,
    where: str,
) -> torch.Tensor:
    """Rows (B, R, k) whose outer products sum to the projected Gauss-Newton Hessian.

    For example i with output Jacobian J_i and loss-Hessian factor A_i (A_i A_i^T = d^2 loss /
    d outputs^2), the rows are P J_i^T A_i: R = C rows ("exact") or one row J_i^T v_i with
    E[v v^T] = A A^T ("sampled", a pseudo-label per example for classification).
    """
    if mode not in CURVATURE_MODES:
        raise ValueError(f"curvature mode must be one of {CURVATURE_MODES}, got {mode!r}")
    outputs = fn.forward(params, consts, inputs)
    check_finite(outputs, f"model outputs at {where}")
    outputs = outputs.reshape(outputs.shape[0], -1)
    if mode == "exact":
        factor = task.hessian_factor(outputs, targets)
    else:
        factor = task.sampled_hessian_factor(outputs, targets, generator)
    grads = per_example_gradients(fn, params, consts, factor_objective, inputs, targets, factor.detach())
    batch, rank = factor.shape[0], factor.shape[2]
    flat = {n: g.reshape(batch * rank, -1) for n, g in grads.items()}
    rows = project(flat, projection).reshape(batch, rank, -1)
    check_finite(rows.reshape(batch, -1), f"curvature factors at {where}")
    return rows
