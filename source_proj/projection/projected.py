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

from source_proj.gradients.memory import curvature_batch
from source_proj.gradients.model import Inputs, ModelFunction, take_rows
from source_proj.gradients.per_example import (
    check_finite,
    factor_objective,
    loss_objective,
    per_example_gradients,
)
from source_proj.gradients.tasks import Task
from source_proj.projection.jl import ProjectionConfig, project

CURVATURE_MODES = ("exact", "sampled")  # SourceConfig also takes "auto": the task's default
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
    budget: int | None = None,
    scale: Scale = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows (B, R, k) and signs (R,) or None (all +1) whose signed outer products sum to the
    projected Gauss-Newton Hessian.

    For example i with output Jacobian J_i and loss-Hessian factor A_i (A_i A_i^T = d^2 loss /
    d outputs^2, outputs flattened), the rows are P D^{1/2} J_i^T A_i (D = I without
    ``scale``): R = C rows ("exact") or one random draw ("sampled": a pseudo-label per
    example for classification, per position for language models; see
    ``Task.sampled_hessian_factor``). With ``budget`` (bytes), the backward passes take as
    many examples at a time as their factor rows fit in it (``gradients.memory.curvature_batch``;
    MemoryBudgetError if one example does not).
    """
    if mode not in CURVATURE_MODES:
        raise ValueError(f"curvature mode must be one of {CURVATURE_MODES}, got {mode!r}")
    outputs = fn.forward(params, consts, inputs)
    check_finite(outputs, f"model outputs at {where}")
    batch, width = outputs.shape[0], outputs[0].numel()
    if mode == "exact":  # C x C factors (C = width), formed one backward batch at a time
        signs, rank = None, width
    else:
        sampled, signs = task.sampled_hessian_factor(outputs, targets, generator)
        rank = sampled.shape[2]
    step = batch if budget is None else curvature_batch(fn.num_params(), width, rank, budget)
    parts = []
    for start in range(0, batch, step):
        stop = min(batch, start + step)
        if mode == "exact":
            factor = task.hessian_factor(outputs[start:stop], targets[start:stop])
        else:
            factor = sampled[start:stop]
        grads = per_example_gradients(
            fn, params, consts, factor_objective, take_rows(inputs, slice(start, stop)), targets[start:stop],
            factor.detach(),
        )
        flat = {n: g.reshape(-1, g.shape[-1]) for n, g in grads.items()}
        if scale is not None:
            for name, block in flat.items():
                block.mul_(scale[name])
        parts.append(project(flat, projection).reshape(stop - start, factor.shape[2], -1))
    rows = torch.cat(parts)
    check_finite(rows.reshape(batch, -1), f"curvature factors at {where}")
    return rows, signs
