"""Projected per-example quantities at one checkpoint: the k-vectors everything else uses.

Each function takes a loaded checkpoint (attributed params and constants, and for Adam runs
the checkpoint's D^{1/2}), a batch of examples, and the projection, and returns float32
tensors in the projected space: gradients of a per-example objective (B, k), and
Gauss-Newton factor rows (B, R, k).

Preconditioned optimizers (docs/math.md, section 9): every per-example gradient block taken at a
checkpoint is multiplied in place, element-wise, by that checkpoint's D^{1/2} (name -> (numel,)
from ``trajectory.optimizer_state.Preconditioner.sqrt_scale``) before it is projected; no
buffer beyond the per-example gradients is materialised. Factored weights, whose gradients are
never formed, are rescaled by a rank-one stand-in for their D^{1/2} (an approximation:
``FactoredProjection.fit_scale``).

Two projection structures (``SourceConfig.proj_structure``), dispatched here and nowhere else:

* "dense" (a :class:`ProjectionConfig`): the per-example gradients of every attributed
  parameter are formed and projected by one i.i.d. matrix (``projection.jl``);
* "factored" (a :class:`FactoredProjection`): weights of linear, GPT-2 ``Conv1D`` and
  embedding layers are projected by Kronecker factors through forward hooks, their gradients
  never formed (``projection.kronecker``, ``projection.layer_taps``); every other attributed
  parameter goes through the dense projection;
* "grouped" (a :class:`GroupedProjection`): the per-example gradients are formed as for
  "dense", and each layer's are projected by its own i.i.d. matrix, k shared among the layers
  by their measured gradient energy (``projection.grouped``).

``SourceConfig``'s "auto" (its default) is resolved to one of them per model by
:func:`resolve_structure` before a projection is made.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from source_proj.errors import InputError
from source_proj.gradients.activations import activation_cost
from source_proj.gradients.memory import curvature_batch
from source_proj.gradients.model import Inputs, ModelFunction, take_rows
from source_proj.gradients.per_example import (
    ExampleFn,
    check_finite,
    factor_objective,
    loss_objective,
    per_example_gradients,
    per_example_tapped,
)
from source_proj.gradients.tasks import Task
from source_proj.projection.grouped import GroupedProjection
from source_proj.projection.jl import ProjectionConfig, project
from source_proj.projection.kronecker import (
    FactoredProjection,
    FittedScale,
    plan_budget,
    project_formed,
)
from source_proj.projection.layer_names import layer_members
from source_proj.projection.layer_taps import LayerTaps, Tap, find_taps
from source_proj.projection.options import CURVATURE_MODES, STRUCTURES, auto_structure

Projection = ProjectionConfig | FactoredProjection | GroupedProjection
# name -> (numel,) D^{1/2} of a checkpoint, or it prepared for the factored projection
# (``FactoredProjection.fit_scale``), or None (no preconditioner).
Scale = Mapping[str, torch.Tensor] | FittedScale | None
# Relative difference above which the hooks' projection of a weight disagrees with autograd's.
_TAP_CHECK_TOLERANCE = 1e-3


def _taps(fn: ModelFunction) -> tuple[dict[str, tuple[int, int]], tuple[Tap, ...]]:
    """The factorable weights of ``fn``'s model and their taps (found once per model function)."""
    if "taps" not in fn.runtime:
        fn.runtime["taps"] = find_taps(fn.model, fn.names, fn.aliases)
    return fn.runtime["taps"]


def resolve_structure(structure: str, fn: ModelFunction, **thresholds: Any) -> str:
    """``structure`` itself, or for "auto" the structure :func:`~source_proj.projection.options.auto_structure`
    picks from ``fn``'s attributed parameters, the factorable weights among them and whether
    it has embedding tables (:func:`has_embeddings`); ``thresholds``: its keyword arguments
    (``dense_max_params``, ``grouped_max_params``, ``min_factorable_share``), its defaults
    otherwise."""
    if structure != "auto":
        return structure
    weights, _ = _taps(fn)
    factorable = sum(rows * cols for rows, cols in weights.values())
    return auto_structure(fn.num_params(), factorable, has_embeddings(fn), **thresholds)


def has_embeddings(fn: ModelFunction) -> bool:
    """Whether an ``nn.Embedding``'s table is among ``fn``'s attributed parameters (the mark of
    a language model or another transformer, for the "auto" settings)."""
    return any(tap.kind == "embedding" for tap in _taps(fn)[1])


def make_projection(config: ProjectionConfig, structure: str, fn: ModelFunction, terms: int = 1) -> Projection:
    """The projection of ``fn``'s attributed parameters: ``config`` itself ("dense"), the
    factored projection with ``config.dim`` shared out as a total budget and up to ``terms``
    Kronecker products per weight ("factored"), or the grouped projection of ``fn``'s layers,
    its shares still to be measured (``GroupedProjection.with_energies``; "grouped")."""
    if structure not in STRUCTURES:
        raise InputError(f"proj_structure must be one of {STRUCTURES}, got {structure!r}")
    if structure == "dense":
        return config
    shapes = dict(fn.model.named_parameters())
    if structure == "grouped":
        groups = layer_members(fn.names)
        return GroupedProjection(config, groups, tuple(sum(shapes[n].numel() for n in g) for g in groups))
    weights, _ = _taps(fn)
    rest = {n: shapes[n].numel() for n in fn.names if n not in weights}
    return FactoredProjection(config, plan_budget(weights, rest, config.dim, terms))


def with_seed(projection: Projection, seed: int) -> Projection:
    """The same projection (structure, sizes, kind, backend) drawn from another seed."""
    if isinstance(projection, FactoredProjection):
        return dataclasses.replace(projection, config=dataclasses.replace(projection.config, seed=seed), _cache={})
    if isinstance(projection, GroupedProjection):
        return dataclasses.replace(projection, config=dataclasses.replace(projection.config, seed=seed))
    return dataclasses.replace(projection, seed=seed)


def layer_groups(projection: Projection) -> torch.Tensor | None:
    """(dim,) int64: the layer of each feature coordinate (``FactoredProjection``'s blocks or
    ``GroupedProjection``'s groups), for ``curvature_blocks="layer"``; None for the dense
    projection, whose coordinates mix every layer."""
    if isinstance(projection, FactoredProjection):
        return projection.plan.layer_groups()
    if isinstance(projection, GroupedProjection):
        return projection.layer_groups()
    return None


def gradient_width(projection: Projection, num_params: int) -> int:
    """Floats per example in the per-example gradient buffers: p (dense), or the parameters
    not factored plus the factored blocks' coordinates ("factored")."""
    if isinstance(projection, FactoredProjection):
        return projection.plan.rest_numel + projection.dim
    return num_params


def describe(projection: Projection) -> dict:
    """JSON-serialisable description of a projection (recorded in feature stores): dim, seed
    and kind, and for the factored and grouped structures ``structure`` and every block's or
    group's sizes (a dense description has no ``structure`` entry, as stores written before it
    had none)."""
    if isinstance(projection, (FactoredProjection, GroupedProjection)):
        return {"dim": projection.dim, **projection.describe()}
    return {"dim": projection.dim, "seed": projection.seed, "kind": projection.kind}


def check_tapped(
    fn: ModelFunction,
    params: dict,
    consts: dict,
    objective: ExampleFn,
    inputs: Inputs,
    targets: torch.Tensor,
    taps: LayerTaps,
    projected: dict[str, torch.Tensor],
    extra: torch.Tensor | None,
) -> None:
    """Compare, for the first example (and factor column), the hooks' projection of every
    tapped weight with F_r^T dW F_c from autograd's dW; ValueError naming the weight when they
    differ, i.e. when it is also used outside its modules' forward."""
    tapped = {n: params[n] for n in taps.weights}
    others = {**consts, **{n: v for n, v in params.items() if n not in tapped}}
    first = None if extra is None else extra[:1, :, :1]
    dense = per_example_gradients(fn, tapped, others, objective, take_rows(inputs, slice(0, 1)), targets[:1], first)
    for name, value in dense.items():
        want = project_formed(value.reshape(params[name].shape), *taps.sides[name], taps.terms[name])
        got = projected[name].reshape(-1, want.numel())[0] if name in projected else torch.zeros_like(want)
        gap = float((got - want).norm() / (want.norm() + got.norm()).clamp_min(1e-30))
        if gap > _TAP_CHECK_TOLERANCE:
            modules = [t.path for t in taps.taps if t.param == name]
            raise InputError(
                f"factored projection: the gradient of {name!r} seen through the forward of {modules} differs "
                f"from autograd's (relative difference {gap:.2g}): the weight is also used outside those "
                "modules' forward (functionally, or by another module); use proj_structure='dense', or leave "
                "it out of param_names"
            )


def _per_example(
    fn: ModelFunction,
    params: dict,
    consts: dict,
    objective: ExampleFn,
    inputs: Inputs,
    targets: torch.Tensor,
    projection: Projection,
    extra: torch.Tensor | None = None,
    scale: Scale = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(gradients still to project, projections already made) per example, (B, [R,] width),
    rescaled by ``scale`` (D^{1/2}): exactly for gradients still to project, through the
    rank-one stand-in of ``FactoredProjection.fit_scale`` for factored weights."""
    blocks: dict[str, torch.Tensor]
    if not isinstance(projection, FactoredProjection):
        assert not isinstance(scale, FittedScale), "a FittedScale is made for a factored projection"
        exact = scale
        grads, blocks = per_example_gradients(fn, params, consts, objective, inputs, targets, extra), {}
    else:
        fitted = projection.fit_scale(scale) if isinstance(scale, Mapping) else scale
        exact = None if fitted is None else fitted.exact
        device = next(iter(params.values())).device
        plan = projection.plan.blocks
        sides = dict(zip((b.name for b in plan), projection.sides(device, None if fitted is None else fitted.rank_one)))
        taps = LayerTaps(_taps(fn)[1], sides, {b.name: b.terms for b in plan})
        grads, blocks = per_example_tapped(fn, params, consts, objective, inputs, targets, taps, extra)
        if not fn.runtime.get("taps_checked"):
            check_tapped(fn, params, consts, objective, inputs, targets, taps, blocks, extra)
            fn.runtime["taps_checked"] = True
    if exact is not None:
        for name, block in grads.items():
            block.mul_(exact[name].to(block.dtype))
    return grads, blocks


def _finish(projection: Projection, grads: dict[str, torch.Tensor], blocks: dict[str, torch.Tensor]) -> torch.Tensor:
    """(rows, dim) float32 features from (rows, numel) gradients and (rows, k_r k_c) blocks."""
    if isinstance(projection, FactoredProjection):
        rows = next(iter((*grads.values(), *blocks.values()))).shape[0]
        return projection.assemble(blocks, grads, rows)
    if isinstance(projection, GroupedProjection):
        return projection.project(grads)
    return project(grads, projection)


def projected_gradients(
    fn: ModelFunction,
    states: Iterable[tuple[dict, dict, str, Scale]],
    objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: Inputs,
    targets: torch.Tensor,
    projection: Projection,
) -> torch.Tensor:
    """P sum_c D_c^{1/2} grad_theta objective(z_i; theta_c) for each example, (B, k) float32.

    ``states`` yields loaded checkpoints (params, consts, where, scale), one at a time;
    ``where`` names the checkpoint in errors about NaN/inf; ``scale`` is its D^{1/2} or None
    (identity). ``objective`` is a per-example function (B, C), (B, ...) -> (B,) such as the
    task's loss or measurement. P is linear, so the per-example gradients are summed in
    float32 first and projected once: C checkpoints cost one projection (the costly part: it
    regenerates P) and one more B x p float32 buffer. Factored blocks are projected at each
    checkpoint and summed.
    """
    totals: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None
    for params, consts, where, scale in states:
        parts = _per_example(fn, params, consts, loss_objective(objective), inputs, targets, projection, None, scale)
        for part in parts:
            for name, block in part.items():
                check_finite(block, f"gradients of {name!r} at {where}")
        if totals is None:
            grads, blocks = ({name: block.to(torch.float32) for name, block in part.items()} for part in parts)
            totals = (grads, blocks)
            continue
        for total, part in zip(totals, parts):
            for name, block in part.items():
                if name in total:
                    total[name].add_(block)
                else:  # a factored block whose modules the earlier checkpoints did not call
                    total[name] = block.to(torch.float32)
    if totals is None:
        raise InputError("no checkpoints to take gradients at")
    return _finish(projection, *totals)


def projected_gn_factors(
    fn: ModelFunction,
    params: dict,
    consts: dict,
    task: Task,
    inputs: Inputs,
    targets: torch.Tensor,
    projection: Projection,
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
    ``Task.sampled_hessian_factor``; a task that :attr:`~Task.draws_before_forward` has its
    draw's noise drawn first and each column formed from the outputs of the gradients' own
    forward, so the batch is not run forward on its own). With ``budget`` (bytes), the backward passes take as
    many examples at a time as their factor rows and activations (measured once per row shape)
    fit in it (``gradients.memory.curvature_batch``; MemoryBudgetError if one example does not).
    """
    if mode not in CURVATURE_MODES:
        raise InputError(f"curvature mode must be one of {CURVATURE_MODES}, got {mode!r}")
    batch = int(targets.shape[0])
    drawn = mode == "sampled" and task.draws_before_forward
    if drawn:  # one row's forward gives the outputs' shape, which the noise needs
        probe = fn.forward(params, consts, take_rows(inputs, slice(0, 1)))
        width, signs, rank = probe[0].numel(), None, 1
        noise = task.sampling_noise(targets, (batch, *probe.shape[1:]), generator).to(probe.device)

        def drawn_objective(out: torch.Tensor, y: torch.Tensor, flat_noise: torch.Tensor | None) -> torch.Tensor:
            # This example's column from its own outputs (no gradient through the draw).
            assert flat_noise is not None, "the noise is passed as the extra argument"
            column = task.sampled_columns(out.detach(), y, flat_noise.reshape(1, *noise.shape[1:]))
            return factor_objective(out, y, column[..., 0])
    else:
        outputs = fn.forward(params, consts, inputs)
        check_finite(outputs, f"model outputs at {where}")
        width = outputs[0].numel()
        if mode == "exact":  # C x C factors (C = width), formed one backward batch at a time
            signs, rank = None, width
        else:
            sampled, signs = task.sampled_hessian_factor(outputs, targets, generator)
            rank = sampled.shape[2]
    if budget is None:
        step = batch
    else:
        activations = activation_cost(fn, params, consts, task.loss, inputs, targets)
        step = curvature_batch(gradient_width(projection, fn.num_params()), width, rank, budget, activations)
    objective = drawn_objective if drawn else factor_objective
    parts = []
    for start in range(0, batch, step):
        stop = min(batch, start + step)
        if drawn:  # (rows, noise per row, one column)
            factor = noise[start:stop].reshape(stop - start, -1, 1)
        elif mode == "exact":
            factor = task.hessian_factor(outputs[start:stop], targets[start:stop])
        else:
            factor = sampled[start:stop]
        grads, blocks = _per_example(
            fn, params, consts, objective, take_rows(inputs, slice(start, stop)), targets[start:stop],
            projection, factor.detach(), scale,
        )
        flat = {n: g.reshape(-1, g.shape[-1]) for n, g in grads.items()}
        flat_blocks = {n: g.reshape(-1, g.shape[-1]) for n, g in blocks.items()}
        parts.append(_finish(projection, flat, flat_blocks).reshape(stop - start, factor.shape[2], -1))
    rows = torch.cat(parts)
    check_finite(rows.reshape(batch, -1), f"curvature factors at {where}")
    return rows, signs
