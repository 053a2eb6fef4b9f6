"""Every projected quantity of one trained run that the estimators compared here consume.

SOURCE (any number of segments, either query mode, any time scale), TracIn, influence
functions and TRAK are all functions of the same per-checkpoint projected gradients and
Gauss-Newton Hessians; :func:`project_run` computes them once, with the core's own routines
(``projected_gradients`` and ``SourceAttributor.checkpoint_hessian``), so every estimator
sees identical numbers and the comparison is about the estimator, not the plumbing. For an
Adam trajectory every quantity is taken in the D^{1/2}-rescaled coordinates, as the core
does (describe the same checkpoints as "sgd" for the unpreconditioned quantities).

Dense projections nest: entry (i, j) of the random matrix R does not depend on k, so the
projection to k' < k is ``v[:, :k'] * sqrt(k / k')`` (and a Hessian's leading k' x k' block
times k / k'). :meth:`ProjectedRun.truncate` uses that for the projection-dimension ablation.
Factored and grouped projections (``structure="factored"``, ``"grouped"``) do not nest: their runs
cannot be truncated.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from source_proj.attributor import SourceAttributor
from source_proj.config import SourceConfig
from source_proj.errors import InputError
from source_proj.gradients.data import Examples, as_examples
from source_proj.gradients.model import ModelFunction
from source_proj.gradients.tasks import Task
from source_proj.projection.options import CURVATURE_MODES
from source_proj.projection.projected import (
    Projection,
    describe,
    layer_groups,
    projected_gradients,
)
from source_proj.trajectory.checkpoints import Trajectory

_CHUNK = 256


@dataclass(frozen=True)
class ProjectedRun:
    """Projected gradients and curvature of one run (CPU tensors; k = projection dim).

    Attributes:
        trajectory: the run's checkpoints (C of them) and optimizer settings.
        seed: seed of the projection; kind: its entry distribution.
        structure: "dense", "factored" or "grouped"; kronecker_terms: the factored projection's r;
        budget: the k it was asked for (``dim`` is what the factored budget gave).
        attributed_stage: the stage whose rows are attributed.
        stage_sizes: stage -> number of rows the stage trained on.
        train_grads: (C, N, k) float32 projected loss gradients of the N attributed rows at
            each checkpoint.
        query_grads: (C, n_query, k) float32 projected measurement gradients of the queries.
        hessians: curvature mode ("exact" / "sampled") -> (C, k, k) float64 projected
            Gauss-Newton Hessian of the mean loss over the checkpoint's own stage data
            (without weight decay).
        final_hessian: (k, k) float64 projected Gauss-Newton Hessian at the final checkpoint
            over the rows of all stages pooled (what a method that sees one data set uses), of
            curvature ``final_curvature``.
        final_curvature: "exact" when the run computed exact curvature, else the mode it did
            compute (e.g. "sampled" for a language model projected with sampled curvature only).
        final_output_grads: (N_all, k) float32 projected measurement gradients at the final
            checkpoint of the rows of all stages (TRAK's feature matrix).
        decays: (C,) the rate added to each checkpoint's Hessian diagonal (the weight decay,
            or Adam's coupled-L2 stand-in; ``Preconditioner.decays``).
        default_curvature: the task's curvature mode for ``SourceConfig(curvature="auto")``.
        layer_groups: (k,) the layer of each coordinate of a factored or grouped projection
            (``projection.projected.layer_groups``, for ``curvature_blocks="layer"``); None when dense.
        curvature_blocks: "full" or "layer", what ``SourceConfig(curvature_blocks="auto")``
            resolved to for the model (``projection.options.auto_curvature_blocks``).
    """

    trajectory: Trajectory
    seed: int
    kind: str
    attributed_stage: Hashable
    stage_sizes: Mapping[Hashable, int]
    train_grads: torch.Tensor
    query_grads: torch.Tensor
    hessians: Mapping[str, torch.Tensor]
    final_hessian: torch.Tensor
    final_output_grads: torch.Tensor
    decays: tuple[float, ...]
    default_curvature: str = "exact"
    final_curvature: str = "exact"
    structure: str = "dense"
    kronecker_terms: int = 4
    budget: int = 0
    layer_groups: torch.Tensor | None = None
    curvature_blocks: str = "full"

    @property
    def dim(self) -> int:
        """k, the projected dimension."""
        return int(self.train_grads.shape[-1])

    @property
    def num_train(self) -> int:
        """N, the number of attributed rows."""
        return int(self.train_grads.shape[1])

    def truncate(self, dim: int) -> ProjectedRun:
        """The same run projected to ``dim`` <= k coordinates (exactly what projecting with
        the same seed and ``dim`` gives)."""
        if not 1 <= dim <= self.dim:
            raise InputError(f"can only truncate to 1..{self.dim} dimensions, got {dim}")
        if self.structure != "dense" and dim != self.dim:
            raise InputError(f"a {self.structure} projection does not nest: project the run again with the other k")
        scale = math.sqrt(self.dim / dim)

        def vec(t: torch.Tensor) -> torch.Tensor:
            return t[..., :dim] * scale

        def mat(t: torch.Tensor) -> torch.Tensor:
            return t[..., :dim, :dim] * scale**2

        return dataclasses.replace(
            self,
            train_grads=vec(self.train_grads),
            query_grads=vec(self.query_grads),
            hessians={mode: mat(h) for mode, h in self.hessians.items()},
            final_hessian=mat(self.final_hessian),
            final_output_grads=vec(self.final_output_grads),
        )


def _gradients(
    fn: ModelFunction, state: Mapping[str, torch.Tensor], objective, examples: Examples, projection: Projection,
    where: str, scale,
) -> torch.Tensor:
    params, consts = fn.split_state(fn.canonical_state(state, where), torch.device("cpu"))
    parts = []
    for start in range(0, len(examples), _CHUNK):
        inputs, targets = examples.rows(start, min(len(examples), start + _CHUNK))
        parts.append(projected_gradients(fn, [(params, consts, where, scale)], objective, inputs, targets, projection))
    return torch.cat(parts)


def project_run(
    model: nn.Module,
    task: Task,
    trajectory: Trajectory,
    stage_data: Mapping[Hashable, tuple[torch.Tensor, torch.Tensor]],
    attributed_stage: Hashable,
    queries: tuple[torch.Tensor, torch.Tensor],
    proj_dim: int,
    seed: int = 0,
    curvature_modes: Sequence[str] = CURVATURE_MODES,
    progress: bool = True,
    structure: str = "dense",
    kronecker_terms: int = 4,
) -> ProjectedRun:
    """Compute a :class:`ProjectedRun`.

    Args:
        model: the architecture (weights come from the checkpoints).
        task: training loss, measurement and Hessian factors.
        trajectory: checkpoints and optimizer settings.
        stage_data: stage -> (inputs, targets) the stage trained on (every stage present).
        attributed_stage: the stage whose rows are attributed.
        queries: (inputs, targets) of the queries.
        proj_dim: k.
        seed: projection seed (and seed of sampled curvature, as in ``SourceAttributor``).
        curvature_modes: which Hessians to compute ("exact", "sampled"); only these are
            computed: the final pooled Hessian too is exact only when "exact" is asked for
            (else of the first mode, see ``ProjectedRun.final_curvature``).
        progress: show a progress bar over checkpoints.
        structure, kronecker_terms: the projection's structure (``SourceConfig.proj_structure``;
            the run records "auto" as the structure it resolved to)
            and, when factored, its Kronecker terms.
    """
    missing = [s for s in trajectory.stages if s not in stage_data]
    if missing:
        raise InputError(f"stage_data lacks stages {missing}")
    if attributed_stage not in trajectory.stages:
        raise InputError(f"attributed_stage {attributed_stage!r} is not a stage of the trajectory {trajectory.stages}")
    modes = tuple(dict.fromkeys(curvature_modes))
    unknown = [m for m in modes if m not in CURVATURE_MODES]
    if not modes or unknown:
        raise InputError(f"curvature_modes must name some of {CURVATURE_MODES}, got {tuple(curvature_modes)!r}")
    config = SourceConfig(proj_dim=proj_dim, seed=seed, backend="cpu", progress=False, chunk_size=_CHUNK,
                          proj_structure=structure, kronecker_terms=kronecker_terms)
    engines = {mode: SourceAttributor(model, task, trajectory, config, curvature=mode) for mode in modes}
    final_mode = "exact" if "exact" in engines else modes[0]
    final_engine = engines[final_mode]
    data = {s: as_examples(d, f"data of stage {s!r}") for s, d in stage_data.items()}
    attributed = data[attributed_stage]
    # A grouped projection's shares, measured once on the attributed rows, for every engine.
    final_engine.measure_projection(attributed)
    fn, projection = final_engine.model_fn, final_engine.projection
    for engine in engines.values():
        engine.use_recorded_projection(describe(projection))
    query_examples = as_examples(queries, "queries")
    last = len(trajectory.checkpoints) - 1
    train_grads, query_grads = [], []
    hessians: dict[str, list[torch.Tensor]] = {mode: [] for mode in modes}
    for c, ckpt in enumerate(tqdm(trajectory.checkpoints, desc="projected run", disable=not progress, leave=False)):
        state = ckpt.load()
        scale = final_engine.gradient_scale(c)
        train_grads.append(_gradients(fn, state, task.loss, attributed, projection, f"checkpoint {c}", scale))
        query_grads.append(_gradients(fn, state, task.measurement, query_examples, projection, f"checkpoint {c}", scale))
        for mode, engine in engines.items():
            hessians[mode].append(engine.checkpoint_hessian(c, data[ckpt.stage]))
    sizes = {s: len(d) for s, d in data.items()}
    final_stage = trajectory.checkpoints[last].stage
    at_final = {
        s: hessians[final_mode][last] if s == final_stage else final_engine.checkpoint_hessian(last, d)
        for s, d in data.items()
    }
    final_hessian = sum(sizes[s] * h for s, h in at_final.items()) / sum(sizes.values())
    assert isinstance(final_hessian, torch.Tensor)  # a sum over at least one stage
    final_state = trajectory.checkpoints[last].load()
    final_scale = final_engine.gradient_scale(last)
    output_grads = torch.cat(
        [_gradients(fn, final_state, task.measurement, d, projection, "final checkpoint", final_scale) for d in data.values()]
    )
    return ProjectedRun(
        trajectory=trajectory,
        seed=seed,
        kind=config.proj_kind,
        attributed_stage=attributed_stage,
        stage_sizes=sizes,
        train_grads=torch.stack(train_grads),
        query_grads=torch.stack(query_grads),
        hessians={mode: torch.stack(h) for mode, h in hessians.items()},
        final_hessian=final_hessian,
        final_output_grads=output_grads,
        decays=final_engine.preconditioner.decays,
        default_curvature=task.default_curvature,
        final_curvature=final_mode,
        structure=final_engine.config.proj_structure,  # "auto" resolved for the model
        kronecker_terms=kronecker_terms,
        budget=proj_dim,
        layer_groups=layer_groups(projection),
        curvature_blocks=final_engine.config.curvature_blocks,  # "auto" resolved for the model
    )
