"""Projected per-example quantities at one checkpoint: the k-vectors everything else uses.

Each function takes a loaded checkpoint (attributed params and constants, and for Adam runs
the checkpoint's D^{1/2}), a batch of examples, and the projection, and returns float32
tensors in the projected space: gradients of a per-example objective (B, k), and
Gauss-Newton factor rows (B, R, k).

Preconditioned optimizers (math note, section 4): every per-example gradient block taken at a
checkpoint is multiplied in place, element-wise, by that checkpoint's D^{1/2} (name -> (numel,)
from ``trajectory.optimizer_state.Preconditioner.sqrt_scale``) before it is projected, on
either projection path; no buffer beyond the per-example gradients is materialised.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from source_proj.gradients.per_example import (
    Inputs,
    ModelFunction,
    check_finite,
    factor_objective,
    loss_objective,
    per_example_gradients,
)
from source_proj.gradients.tasks import Task
from source_proj.projection.jl import ProjectionConfig, project

CURVATURE_MODES = ("exact", "sampled")
# name -> (numel,) D^{1/2} of a checkpoint, or None (no preconditioner).
Scale = Mapping[str, torch.Tensor] | None


def projected_gradients(
    fn: ModelFunction,
    states: Iterable[tuple[dict, dict, str, Scale]],
    objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: Inputs,
    targets: torch.Tensor,
    projection: ProjectionConfig,
) -> torch.Tensor:
    """P sum_c D_c^{1/2} grad_theta objective(z_i; theta_c) for each example, (B, k) float32.

    ``states`` yields loaded checkpoints (params, consts, where, scale), one at a time;
    ``where`` names the checkpoint in errors about NaN/inf; ``scale`` is its D^{1/2} or None
    (identity). ``objective`` is a per-example function (B, C), (B, ...) -> (B,) such as the
    task's loss or measurement. P is linear, so the per-example gradients are summed in
    float32 first and projected once: C checkpoints cost one projection (the costly part: it
    regenerates P) and one more B x p float32 buffer.
    """
    total: dict[str, torch.Tensor] | None = None
    for params, consts, where, scale in states:
        grads = per_example_gradients(fn, params, consts, loss_objective(objective), inputs, targets)
        for name, block in grads.items():
            check_finite(block, f"gradients of {name!r} at {where}")
        if total is None:
            total = {name: block.to(torch.float32) for name, block in grads.items()}
            if scale is not None:
                for name, block in total.items():
                    block.mul_(scale[name])
        else:
            for name, block in grads.items():
                if scale is None:
                    total[name].add_(block)
                else:
                    total[name].addcmul_(block, scale[name])
    if total is None:
        raise ValueError("no checkpoints to take gradients at")
    return project(total, projection)


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
    scale: Scale = None,
) -> torch.Tensor:
    """Rows (B, R, k) whose outer products sum to the projected Gauss-Newton Hessian.

    For example i with output Jacobian J_i and loss-Hessian factor A_i (A_i A_i^T = d^2 loss /
    d outputs^2), the rows are P D^{1/2} J_i^T A_i (D = I without ``scale``): R = C rows
    ("exact") or one row J_i^T v_i with E[v v^T] = A A^T ("sampled", a pseudo-label per
    example for classification).
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
    if scale is not None:
        for name, block in flat.items():
            block.mul_(scale[name])
    rows = project(flat, projection).reshape(batch, rank, -1)
    check_finite(rows.reshape(batch, -1), f"curvature factors at {where}")
    return rows
