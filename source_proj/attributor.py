"""``SourceAttributor``: the orchestrating object users work with.

    attributor = SourceAttributor(model, "classification", trajectory, proj_dim=1024)
    attributor.fit((x_train, y_train))
    scores = attributor.score((x_query, y_query))      # (n_query, N); > 0: proponent
    self_inf = attributor.self_influence()             # (N,)

``fit`` runs two passes: curvature (projected Gauss-Newton Hessians at every checkpoint,
averaged and eigendecomposed per segment) and features (per example, the projected loss
gradients at every checkpoint, averaged per segment and preconditioned). Both are pure
functions of the inputs; see ``curvature``, ``features`` and ``projected``.

Adam / AdamW trajectories: every gradient taken at checkpoint c (training rows, queries,
Gauss-Newton factor rows, self-influence) is rescaled by that checkpoint's D_c^{1/2} before
projection (``trajectory.optimizer_state``), which turns the SGD formulas into the
preconditioned ones (docs/math.md, section 9). Approximations: D may differ between
checkpoints, and the cross terms D_l^{-1/2} D_l'^{1/2} between segments are dropped (each
gradient is rescaled by its own checkpoint's D, the rescaled-space formulas are then those of
SGD); Adam's coupled L2 decay lambda D is replaced by lambda c I (see ``optimizer_state``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from source_proj.config import SourceConfig
from source_proj.curvature.spectra import (
    SegmentSpectrum,
    gauss_newton_gram,
    segment_spectra,
    transport_operators,
)
from source_proj.distributed.failures import together
from source_proj.distributed.gather import gather_rows, merge_mappings
from source_proj.distributed.group import ProcessGroup
from source_proj.distributed.reduce import TreeSum, tree_total
from source_proj.errors import InputError
from source_proj.features.query_forms import QueryForm, query_form
from source_proj.features.rows import row_dot, segment_features
from source_proj.features.source import FeatureSource, MemoryFeatures
from source_proj.gradients.activations import activation_cost
from source_proj.gradients.data import Examples, as_examples, row_shapes
from source_proj.gradients.memory import feature_chunk
from source_proj.gradients.model import ModelFunction, OutputSelector
from source_proj.gradients.per_example import check_finite, dataset_rows, loss_objective, per_example_gradients
from source_proj.gradients.task_names import resolve_task
from source_proj.gradients.tasks import Task
from source_proj.projection.grouped import ENERGY_ROWS, GroupedProjection, squared_norms
from source_proj.projection.kronecker import FactoredProjection, FittedScale
from source_proj.projection.projected import (
    Projection,
    Scale,
    describe,
    gradient_width,
    has_embeddings,
    layer_groups,
    make_projection,
    projected_gn_factors,
    projected_gradients,
    resolve_structure,
    with_seed,
)
from source_proj.retrieval.exact import TopK, exact_proponents_opponents, exact_topk
from source_proj.retrieval.group import group_influence
from source_proj.store_fit import examples_digest, fit_store, open_store
from source_proj.trajectory.checkpoints import (
    Segment,
    Trajectory,
    TrajectoryError,
    state_files,
)
from source_proj.trajectory.digests import FileDigests, StateDigests, fast_digest, state_digests
from source_proj.trajectory.optimizer_state import Preconditioner


@dataclass(frozen=True)
class RowFeatures:
    """Features of a chunk of training rows (CPU tensors).

    Attributes:
        features: (n, D) float32, the index-ready F (D = k, or L*k in "segment" mode).
        segment_features: (n, L, k) float32 per-segment F_l, or None when not kept.
        self_influence: (n,) float64, predicted rise of each row's own loss if it were removed.
    """

    features: torch.Tensor
    segment_features: torch.Tensor | None
    self_influence: torch.Tensor


Method = TypeVar("Method", bound=Callable[..., Any])


def _one_reading(method: Method) -> Method:
    """``method`` run in a :meth:`SourceAttributor.reading_pass`: each checkpoint read once."""

    @functools.wraps(method)
    def wrapped(self: SourceAttributor, *args: Any, **kwargs: Any) -> Any:
        with self.reading_pass():
            return method(self, *args, **kwargs)

    return cast(Method, wrapped)


# Bytes of checkpoint Hessians an attributor keeps between fits (``SourceAttributor._kept_hessian``).
HESSIAN_CACHE_BYTES = 1 << 30


class SourceAttributor:
    """SOURCE training data attribution in a random-projection space.

    Args:
        model: the trained architecture (its current weights are not used; every state comes
            from the trajectory). It is put in eval mode.
        task: a :class:`Task`, or "classification" / "regression".
        trajectory: the checkpoints and optimizer settings of the run.
        config: settings; keyword arguments (e.g. ``proj_dim=2048, seed=1``) override fields.
        param_names: attribute through these parameters only (default: all): parameter
            names, module names or fnmatch patterns such as ``"transformer.h.*.mlp.*"`` or
            ``"lm_head"`` (a tied tensor is selected by any of its names).
        output: which tensor of the model's output the task sees: None (a tensor as is, the
            ``"logits"`` of a dict or ``ModelOutput``, the first element of a tuple), a key,
            or a callable on the raw output.

    Raises ``MemoryBudgetError`` (a ValueError) before any work if one example's per-example
    gradients, or an explicit ``chunk_size``'s, exceed ``max_gradient_memory``; and, with the
    activations measured on the data's first row, when the data is checked.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task | str,
        trajectory: Trajectory,
        config: SourceConfig | None = None,
        *,
        param_names: Sequence[str] | None = None,
        output: OutputSelector = None,
        **settings: Any,
    ) -> None:
        self.config = dataclasses.replace(config or SourceConfig(), **settings)
        self.task = resolve_task(task)
        self.trajectory = trajectory
        self.model_fn = ModelFunction.build(model.eval(), param_names, output)
        # "auto" resolved for this model: stores record (and reopen with) the structure used.
        structure = resolve_structure(self.config.proj_structure, self.model_fn)
        blocks = self.config.resolved_curvature_blocks(structure, has_embeddings(self.model_fn))
        self.config = dataclasses.replace(self.config, proj_structure=structure, curvature_blocks=blocks)
        self.curvature = self.config.resolved_curvature(self.task.default_curvature)
        self.budget = self.config.gradient_budget()
        self.segments: tuple[Segment, ...] = trajectory.segments(
            self.config.num_segments, self.config.momentum_factor, self.config.time_scale
        )
        self.query_form: QueryForm = query_form(self.config.resolved_query_mode(len(trajectory.stages)), self.segments)
        if self.config.segment_projections and not self.query_form.per_segment:
            raise InputError(
                "segment_projections needs the per-segment query form (query_mode='segment', or 'auto' "
                f"on a run of one stage): the {self.query_mode!r} form carries query gradients across "
                "segments, in one projection"
            )
        self._install_projection(make_projection(
            self.config.projection(), self.config.proj_structure, self.model_fn, self.config.kronecker_terms
        ))
        self._segment_of = {c: l for l, seg in enumerate(self.segments) for c in seg.checkpoints}
        width = gradient_width(self.projection, self.model_fn.num_params())
        self.chunk_size = feature_chunk(width, self.budget, self.config.chunk_size)
        self.group = ProcessGroup.current()
        self._fitted_scales: dict[int, Scale] = {}
        # Rank-one fits of D^{1/2} (factored projection) taken from a store: checkpoint -> fits.
        self._stored_fits: dict[int, Mapping[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.device = torch.device(self.config.device) if self.config.device else next(model.parameters()).device
        # Fail early on a checkpoint that does not fit the model (names and shapes: the values
        # of a memory-mapped file are not read here). Contents are digested on first need.
        for i in range(len(trajectory.checkpoints)):
            self._read_state(i)
        self.file_digests = FileDigests()
        self._digests: dict[int, StateDigests] = {}
        # Inside reading_pass(): checkpoint -> (its files' identity, state) and Adam's D^{1/2} (CPU).
        self._held: dict[int, tuple[tuple | None, dict]] | None = None
        self._held_scales: dict[int, dict[str, torch.Tensor]] = {}
        # Adam's preconditioner: each optimizer state's structure and step counts checked here,
        # its moments' values when first needed.
        self.preconditioner = Preconditioner.build(trajectory, model, self.model_fn.names)
        # Checkpoint Hessians of earlier fits (a per-stage fit of a multi-stage run needs the
        # later stages' again): (checkpoint, rows digest, what else they depend on) -> (k, k).
        self._hessians: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        # The last queries' features, by (rows digest, projection): see query_features.
        self._last_queries: tuple[tuple, torch.Tensor] | None = None
        self.spectra: list[SegmentSpectrum] | None = None
        self.operators: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None
        self.stages: tuple[Hashable, ...] = ()
        self.train_features: torch.Tensor | None = None
        self.train_segment_features: torch.Tensor | None = None
        self._self_influence: torch.Tensor | None = None
        self.features: FeatureSource | None = None

    # ----------------------------------------------------------------- helpers
    def _read_state(self, index: int) -> dict:
        return self.model_fn.canonical_state(self.trajectory.checkpoints[index].load(), f"checkpoint {index}")

    def _files(self, index: int) -> list | None:
        source = self.trajectory.checkpoints[index].state
        return None if isinstance(source, Mapping) else state_files(source)

    @contextmanager
    def reading_pass(self) -> Iterator[None]:
        """A pass over data (a fit, a range of training rows, a set of queries) in which each
        checkpoint and each Adam state is read once: what was read is kept until the pass ends
        (checkpoint files memory-mapped as loaded, D^{1/2} on the CPU) and given again to every
        chunk of rows, a checkpoint only while its files are unchanged (``Checkpoint.identity``:
        a file written since is read and checked again, so one replaced is still refused).
        Passes nest: the outermost keeps the states."""
        if self._held is not None:
            yield
            return
        self._held = {}
        try:
            yield
        finally:
            self._held = None
            self._held_scales = {}

    def _state(self, index: int) -> dict:
        """Checkpoint ``index`` as the model's state dict, checked against its recorded digest
        (every read: a file replaced during a run is refused, not mixed into the results; in a
        :meth:`reading_pass`, read once and kept while its files are unchanged)."""
        identity = self.trajectory.checkpoints[index].identity()
        held = None if self._held is None else self._held.get(index)
        if held is not None and held[0] == identity:
            return held[1]
        state = self._read_state(index)
        known = self._known_digests(index)
        if known is None:
            self._record_digests(index, state)
        elif fast_digest(state) != known.fast:
            source = self.trajectory.checkpoints[index].state
            where = "" if isinstance(source, Mapping) else f" ({os.fspath(source)})"
            raise TrajectoryError(
                f"checkpoint {index}{where} changed during the run (its contents differ from when they were "
                "first read or recorded): restore it, or start again with the new file"
            )
        if self._held is not None:
            self._held[index] = (identity, state)
        return state

    def _known_digests(self, index: int) -> StateDigests | None:
        """The digests of checkpoint ``index`` recorded in this run or cached for its unchanged files."""
        if index not in self._digests:
            files = self._files(index)
            cached = None if files is None else self.file_digests.get(files)
            if cached is not None:
                self._digests[index] = cached
        return self._digests.get(index)

    def _record_digests(self, index: int, state: dict) -> StateDigests:
        digests = self._digests[index] = state_digests(state)
        files = self._files(index)
        if files is not None:
            self.file_digests.put(files, digests)
        return digests

    @property
    def checkpoint_digests(self) -> list[str]:
        """SHA-256 of each checkpoint's state under the model's names (a tied key present or
        absent gives the same digest): cached for files unchanged since they were hashed
        (``use_file_digests``), else read and hashed now."""
        return [self._checked_digests(i).sha256 for i in range(len(self.trajectory.checkpoints))]

    def _checked_digests(self, index: int) -> StateDigests:
        known = self._known_digests(index)
        if known is not None:
            return known
        self._state(index)  # records them (and keeps the state in a pass)
        return self._digests[index]

    def use_file_digests(self, cache: FileDigests) -> None:
        """Take digests of checkpoint files from ``cache`` (e.g. the one a store keeps) where the
        files' size and modification time are unchanged; digests computed later are added to it."""
        self.file_digests = cache

    def _load(self, index: int) -> tuple[dict, dict]:
        return self.model_fn.split_state(self._state(index), self.device)

    def _projected_sum(
        self,
        checkpoints: Sequence[int],
        objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        inputs: Any,
        targets: torch.Tensor,
    ) -> torch.Tensor:
        """P sum_c D_c^{1/2} grad objective at ``checkpoints`` per example, (B, k) float32, one
        projection (D = I without a preconditioner; the checkpoints lie in one segment)."""
        states = ((*self._load(c), f"checkpoint {c}", self.gradient_scale(c)) for c in checkpoints)
        return projected_gradients(
            self.model_fn, states, objective, inputs, targets, self.projection_at(checkpoints[0])
        )

    def projection_at(self, index: int) -> Projection:
        """The projection of the gradients taken at checkpoint ``index`` (its segment's)."""
        projection = self.projections[self._segment_of[index]]
        if isinstance(projection, GroupedProjection) and not projection.measured:
            raise InputError(
                "the grouped projection's shares are measured on the training rows: call fit() or prepare() (or "
                "measure_projection(train_data)) first, or use_store() with the store it was fitted into"
            )
        return projection

    def _install_projection(self, projection: Projection) -> None:
        """Use ``projection``: each segment's copy (its own seed with ``segment_projections``)
        and, with ``curvature_blocks="layer"``, the coordinates' layers."""
        self.projection = projection
        self.projections: tuple[Projection, ...] = (projection,) * len(self.segments)
        if self.config.segment_projections:
            seeds = [(self.config.seed + l) % 2**64 for l in range(len(self.segments))]
            self.projections = tuple(with_seed(projection, s) for s in seeds)
        # The coordinates' layers when each segment's Hessian is block-diagonal over them.
        self.curvature_groups = layer_groups(projection) if self.config.curvature_blocks == "layer" else None

    @_one_reading
    def measure_projection(self, train_data: Any) -> None:
        """Measure the grouped projection's shares (``proj_structure="grouped"``; nothing to do
        for the others, or once measured): each layer's root mean square norm of the rescaled
        per-example loss gradients at the final checkpoint, over at most ``ENERGY_ROWS`` evenly
        spaced rows of ``train_data`` (``projection.grouped``). :meth:`prepare` calls it; under
        ``torch.distributed`` every rank takes rank 0's shares."""
        projection = self.projection
        if not isinstance(projection, GroupedProjection) or projection.measured:
            return
        examples = as_examples(train_data)
        count = min(ENERGY_ROWS, len(examples))
        rows = torch.linspace(0, len(examples) - 1, count).round().long().unique().tolist()
        final = len(self.trajectory.checkpoints) - 1
        params, consts = self._load(final)
        scale = self.gradient_scale(final)
        assert not isinstance(scale, FittedScale), "a grouped projection takes D^{1/2} as it is"
        totals = torch.zeros(len(projection.groups), dtype=torch.float64)
        for start in range(0, len(rows), self.chunk_size):
            chosen = rows[start : start + self.chunk_size]
            inputs, targets = examples.take(chosen, self.device)
            with dataset_rows(chosen):
                grads = per_example_gradients(self.model_fn, params, consts, loss_objective(self.task.loss), inputs, targets)
                for name, block in grads.items():
                    check_finite(block, f"gradients of {name!r} at checkpoint {final}")
            totals += squared_norms(grads, projection.groups, scale)
        energies = (totals / len(rows)).sqrt().tolist()
        energies = merge_mappings(self.group, {"energies": energies} if self.group.is_main else {})["energies"]
        self._install_projection(projection.with_energies(energies))

    def use_recorded_projection(self, recorded: Mapping[str, Any]) -> None:
        """Take the grouped projection's shares from ``recorded`` (a feature store's description
        of its projection) when it describes this attributor's groups; otherwise nothing (the
        store's settings check then names the difference)."""
        projection = self.projection
        if isinstance(projection, GroupedProjection) and not projection.measured:
            adopted = projection.with_recorded_shares(recorded)
            if adopted is not None:
                self._install_projection(adopted)

    def gradient_scale(self, index: int) -> Scale:
        """Adam's D^{1/2} at checkpoint ``index`` as this attributor's projection applies it
        (None without a preconditioner): name -> (numel,) for the dense projection (read again
        when needed: p floats; once per :meth:`reading_pass`, kept on the CPU), ``FittedScale``
        for the factored one (fitted once per checkpoint and kept: its rank-one parts and the
        dense parameters' scales are small)."""
        if index in self._fitted_scales:
            return self._fitted_scales[index]
        scale = self._held_scales.get(index)
        if scale is None:
            scale = self.preconditioner.sqrt_scale(index, "cpu")
            if scale is None:
                return None
            if self._held is not None:
                self._held_scales[index] = scale
        on_device = {n: v.to(self.device) for n, v in scale.items()}
        if isinstance(self.projection, FactoredProjection):
            stored = self._stored_fits.get(index)
            fitted = self._fitted_scales[index] = (
                self.projection.fit_scale(on_device) if stored is None else FittedScale(
                    {n: on_device[n] for n in self.projection.plan.rest},
                    {n: (a.to(self.device), b.to(self.device)) for n, (a, b) in stored.items()},
                )
            )
            return fitted
        return on_device

    def _fit_key(self, index: int) -> str:
        """What the rank-one fit of checkpoint ``index``'s D^{1/2} is a function of: its optimizer
        state (the moments' digest taken when the preconditioner read it), Adam's beta2 and eps,
        and the projection's blocks."""
        state = self.preconditioner.fast_digests[index]
        return repr((state, self.trajectory.betas[1], self.trajectory.eps, describe(self.projection)))

    def rank_one_fits(self) -> dict[str, Any]:
        """The rank-one fits of Adam's D^{1/2} made so far by the factored projection (the costly
        part of preparing a checkpoint's rescaling: ``FactoredProjection.fit_scale``), as CPU
        tensors keyed by what each is a function of (``use_rank_one_fits`` takes them back)."""
        return {
            self._fit_key(i): {n: (a.cpu(), b.cpu()) for n, (a, b) in scale.rank_one.items()}
            for i, scale in self._fitted_scales.items()
            if isinstance(scale, FittedScale)
        }

    def use_rank_one_fits(self, fits: Mapping[str, Any]) -> None:
        """Take rank-one fits saved by :meth:`rank_one_fits` for each checkpoint whose optimizer
        state, Adam settings and projection are those they were fitted with (the key says); the
        others are fitted when first needed. The exact part (D^{1/2} of the densely projected
        parameters) is still read from the optimizer state, checked as every read is."""
        if not (self.trajectory.preconditioned and isinstance(self.projection, FactoredProjection)):
            return
        for index in range(len(self.trajectory.checkpoints)):
            stored = fits.get(self._fit_key(index))
            if stored is not None:
                self._stored_fits[index] = stored

    def _progress(self, items: Iterable[int], desc: str, show: bool = True, nested: bool = False) -> tqdm:
        """``items`` with a progress bar (on rank 0 only, when progress is on and ``show``; a bar
        ``nested`` inside a pass's own bar only with ``verbose``)."""
        shown = show and self.config.progress and self.group.is_main and (self.config.verbose or not nested)
        return tqdm(items, desc=desc, disable=not shown, leave=False, unit="chunk")

    def _chunks(self, stop: int, desc: str, start: int = 0, show: bool = True) -> tqdm:
        """Starts of ``chunk_size`` row chunks in [start, stop), with a progress bar."""
        return self._progress(range(start, stop, self.chunk_size), desc, show)

    @property
    def proj_dim(self) -> int:
        """k, the projected dimension (the factored structure's total; ``proj_dim`` otherwise)."""
        return self.projection.dim

    @property
    def num_segments(self) -> int:
        """L, the total number of segments over all stages."""
        return len(self.segments)

    @property
    def query_mode(self) -> str:
        """The query form's name, "final", "segment" or "staged" (``query_form`` holds its choices)."""
        return self.query_form.name

    @property
    def keeps_segment_features(self) -> bool:
        """Whether per-segment training features are kept."""
        return self.config.keep_segment_features or self.query_form.per_segment

    # --------------------------------------------------------------- curvature
    def checkpoint_hessian(self, index: int, examples: Any) -> torch.Tensor:
        """Projected Gauss-Newton Hessian of the mean loss at checkpoint ``index``, (k, k)
        float64 (of the rescaled gradients, P D^{1/2} G D^{1/2} P^T, for Adam runs), over
        ``examples``: any data :meth:`fit` accepts (e.g. a dict of LM columns) or ``Examples``.

        The curvature examples are taken ``chunk_size`` at a time; under ``torch.distributed``
        each rank computes a contiguous share of the chunks and the chunks' Gram matrices are
        summed in a fixed tree (``TreeSum``), so the result is bit-identical for any number of
        processes (with the same ``chunk_size``). A grouped projection whose shares no fit has
        measured yet takes them from ``examples`` (:meth:`measure_projection`).
        """
        examples = as_examples(examples, f"curvature data at checkpoint {index}")
        self.measure_projection(examples)  # a grouped projection's shares, if no fit measured them yet
        params, consts = self._load(index)
        scale = self.gradient_scale(index)
        count = len(examples)
        chosen = torch.arange(count)
        if self.config.curvature_examples is not None and self.config.curvature_examples < count:
            pick = torch.Generator().manual_seed(self.config.seed % 2**63)
            chosen = torch.randperm(count, generator=pick)[: self.config.curvature_examples].sort().values
        step, tree = self.chunk_size, TreeSum()
        with together(self.group, f"curvature at checkpoint {index}"):
            chunks = self.group.span(-(-len(chosen) // step))
            for leaf in self._progress(chunks, f"curvature @ checkpoint {index}", nested=True):
                rows = chosen[leaf * step : (leaf + 1) * step].tolist()
                inputs, targets = examples.take(rows, self.device)
                with dataset_rows(rows):
                    factors, signs = projected_gn_factors(
                        self.model_fn, params, consts, self.task, inputs, targets, self.projection_at(index),
                        self.curvature, self._noise(index, leaf), f"checkpoint {index}", self.budget, scale,
                    )
                tree.add(leaf, gauss_newton_gram(factors, signs))
        k = self.proj_dim
        total = tree_total(self.group, tree, torch.zeros(k, k, dtype=torch.float64, device=self.device))
        hessian = (total / len(chosen)).cpu()
        check_finite(hessian, f"curvature at checkpoint {index}")
        return hessian

    def _kept_hessian(self, index: int, examples: Examples, digest: int) -> torch.Tensor:
        """:meth:`checkpoint_hessian` of ``examples`` (whose rows digest to ``digest``), kept for
        later fits of this attributor (at most ``HESSIAN_CACHE_BYTES``, the oldest dropped
        first). Everything else it depends on is fixed for an attributor but the chunking
        (which fixes the order of its sums) and the projection (a grouped one's shares)."""
        key = (index, digest, self.chunk_size, repr(describe(self.projection_at(index))))
        kept = self._hessians.get(key)
        if kept is not None:
            self._hessians.move_to_end(key)
            return kept
        hessian = self.checkpoint_hessian(index, examples)
        size = hessian.numel() * hessian.element_size()
        if size <= HESSIAN_CACHE_BYTES:
            while self._hessians and size + sum(h.numel() * h.element_size() for h in self._hessians.values()) > HESSIAN_CACHE_BYTES:
                self._hessians.popitem(last=False)
            self._hessians[key] = hessian
        return hessian

    def _noise(self, checkpoint: int, chunk: int) -> torch.Generator:
        """The generator of the sampled curvature's pseudo-labels for one chunk of curvature
        examples at one checkpoint (its own seed, so any process can draw any chunk's)."""
        state = np.random.SeedSequence([self.config.seed, checkpoint, chunk]).generate_state(2, np.uint32)
        return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)

    def check_training_data(
        self,
        examples: Examples,
        chunk_rows: int = 4096,
        visit: Callable[[int, int, Any, torch.Tensor], None] | None = None,
        *,
        chunks: Collection[int] | None = None,
        what: str = "training data",
        measure: bool = True,
    ) -> None:
        """Validate every row for the task before any costly pass: the model runs on the
        first row (inputs of the shape it takes) and every target suits the task (e.g. class
        labels: integers in [0, C), no ignore index), reading the rows ``chunk_rows`` at a
        time; ``visit(start, stop, inputs, targets)`` is called with each chunk (the feature
        store digests them). ``chunks`` limits the pass to those chunk indices. Queries are
        validated the same way (``what="queries"``). Raises ``InputError`` starting with
        ``what`` and naming the offending rows (indices into ``examples``) and values. Then sets
        ``chunk_size`` for rows of this shape: the budget holds their gradient buffers and
        activations (measured on row 0, ``gradients.activations``; ``MemoryBudgetError`` if not
        one), unless ``measure`` is False (a set of one row: computed in one chunk whatever the
        measure, which itself holds two copies of the row, more than computing it takes)."""
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise InputError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
        first_inputs, first_targets = examples.rows(0, 1, self.device)
        params, consts = self._load(len(self.trajectory.checkpoints) - 1)
        try:
            with torch.no_grad():
                n_outputs = self.model_fn.forward(params, consts, first_inputs).reshape(1, -1).shape[1]
        except (RuntimeError, IndexError) as exc:  # e.g. inputs of another width than the model's
            raise InputError(
                f"{what}: the model cannot run on row 0, inputs of shape {row_shapes(first_inputs)} per row "
                f"({exc}); give rows shaped like the model's training inputs"
            ) from exc
        chosen = range(-(-len(examples) // chunk_rows)) if chunks is None else sorted(chunks)
        for index in self._progress(chosen, f"check {what}"):
            start, stop = index * chunk_rows, min((index + 1) * chunk_rows, len(examples))
            inputs, targets = examples.rows(start, stop)
            try:
                self.task.check_targets(targets, n_outputs, start)
            except InputError as exc:
                raise InputError(f"{what}: {exc}") from exc
            if visit is not None:
                visit(start, stop, inputs, targets)
        if not measure:
            return
        activations = activation_cost(self.model_fn, params, consts, self.task.loss, first_inputs, first_targets)
        width = gradient_width(self.projection, self.model_fn.num_params())
        self.chunk_size = feature_chunk(width, self.budget, self.config.chunk_size, activations)

    def prepare(
        self,
        train_data: Any,
        *,
        stages: Sequence[Hashable] | None = None,
        num_train: int | Mapping[Hashable, int] | None = None,
        curvature_data: Any = None,
    ) -> Examples:
        """Curvature pass: per-segment spectra, the operators M_l and the weights w_l.

        Args:
            train_data: the rows to attribute (tensors, Dataset or DataLoader).
            stages: the stages these rows were trained in (default: all).
            num_train: N per stage, the size of the data set each stage sampled from
                (default: the number of rows given).
            curvature_data: data for the Hessians: one data set for all stages or a mapping
                stage -> data (default: ``train_data`` for the stages it trained in). Needed
                only for the stages whose curvature can change the scores: the attributed
                stages, and in "final" query mode every later one; other segments' Hessians
                are not computed (their spectra are zero-curvature placeholders).
        Returns:
            the rows as :class:`Examples`.
        """
        examples = as_examples(train_data)
        self.measure_projection(examples)
        stages = tuple(self.trajectory.stages if stages is None else stages)
        weights = self.segment_weights(len(examples), stages, num_train)
        # Only these segments' curvature can change the scores (the query form says which).
        attributed = [l for l, w in enumerate(weights) if w > 0]
        used = self.query_form.curvature_segments(attributed)
        per_stage = self._curvature_sources(
            examples, curvature_data, stages, {self.segments[l].stage for l in used}
        )
        digests = {stage: examples_digest(data) for stage, data in per_stage.items()}
        hessians = {}
        for index in tqdm(
            [c for l in sorted(used) for c in self.segments[l].checkpoints],
            desc="curvature", disable=not (self.config.progress and self.group.is_main), unit="checkpoint",
        ):
            stage = self.trajectory.checkpoints[index].stage
            hessians[index] = self._kept_hessian(index, per_stage[stage], digests[stage])
        spectra = segment_spectra(self.segments, hessians, self.preconditioner.decays, used, self.curvature_groups)
        self.set_curvature(spectra, weights)
        return examples

    def set_curvature(self, spectra: Sequence[SegmentSpectrum], weights: Sequence[float]) -> None:
        """Install per-segment spectra and weights w_l (1/N_l, or 0 for segments the rows did
        not train in), as computed by :meth:`prepare` or restored from a feature store."""
        if len(spectra) != self.num_segments or len(weights) != self.num_segments:
            raise InputError(
                f"expected {self.num_segments} segment spectra and weights, got {len(spectra)} and {len(weights)}"
            )
        self.spectra = list(spectra)
        self.operators = transport_operators(self.spectra, self.query_form.carried, self.curvature_groups)
        self.weights = torch.tensor(list(weights), dtype=torch.float64)
        self.stages = tuple(dict.fromkeys(seg.stage for seg, w in zip(self.segments, weights) if w > 0))

    def segment_weights(
        self,
        n_rows: int,
        stages: Sequence[Hashable] | None = None,
        num_train: int | Mapping[Hashable, int] | None = None,
    ) -> list[float]:
        """w_l per segment: 1/N of its stage if the rows trained in that stage, else 0.

        ``stages`` and ``num_train`` are as for :meth:`prepare`; N defaults to ``n_rows``.
        """
        stages = tuple(self.trajectory.stages if stages is None else stages)
        sizes = {}
        for stage in stages:
            self.trajectory.stage_checkpoints(stage)  # raises for an unknown stage
            size = num_train.get(stage, n_rows) if isinstance(num_train, Mapping) else (num_train or n_rows)
            if int(size) < 1:
                raise InputError(f"num_train for stage {stage!r} must be >= 1, got {size}")
            sizes[stage] = int(size)
        return [1.0 / sizes[seg.stage] if seg.stage in sizes else 0.0 for seg in self.segments]

    def _curvature_sources(
        self,
        examples: Examples,
        curvature_data: Any,
        stages: tuple[Hashable, ...],
        needed: Collection[Hashable],
    ) -> dict[Hashable, Examples]:
        """Curvature data per stage in ``needed`` (the stages of segments whose Hessians count)."""
        if isinstance(curvature_data, Mapping):
            given = {s: as_examples(d, f"curvature data of stage {s!r}") for s, d in curvature_data.items()}
        elif curvature_data is not None:
            shared = as_examples(curvature_data, "curvature data")
            given = {s: shared for s in self.trajectory.stages}
        else:
            given = {}
        sources = {s: given.get(s, examples if s in stages else None) for s in self.trajectory.stages if s in needed}
        missing = [s for s, d in sources.items() if d is None]
        if missing:
            raise InputError(
                f"stages {missing} have no curvature data: the attributed rows belong to stages "
                f"{list(stages)}, and the later stages' Hessians carry their effect to the final "
                "model; pass curvature_data={stage: data} for them"
            )
        return {s: d for s, d in sources.items() if d is not None}  # all of them

    # ---------------------------------------------------------------- features
    def featurize_rows(self, examples: Examples, start: int, stop: int) -> RowFeatures:
        """Features of training rows [start, stop) (after :meth:`prepare`); a
        ``NonFiniteError`` names the offending rows by their index in ``examples``."""
        if self.operators is None:
            raise RuntimeError("call prepare() or fit() before featurize_rows()")
        with dataset_rows(range(start, stop)):
            return self._featurize_rows(examples, start, stop)

    def _featurize_rows(self, examples: Examples, start: int, stop: int) -> RowFeatures:
        operators, weights = self.operators, self.weights
        assert operators is not None and weights is not None, "featurize_rows checks that prepare() ran"
        inputs, targets = examples.rows(start, stop, self.device)
        n, k, final_index = stop - start, self.proj_dim, len(self.trajectory.checkpoints) - 1
        sums = torch.zeros(n, self.num_segments, k, dtype=torch.float64, device=self.device)
        # Gradients at the checkpoints of the segments these rows trained in, summed per segment
        # before their one projection, and at the final checkpoint on its own when the query form
        # takes query gradients there (for the self-influence).
        final_grad = None
        if self.query_form.carries:
            final_grad = self._projected_sum([final_index], self.task.loss, inputs, targets)
        for l, seg in enumerate(self.segments):
            if weights[l] == 0:
                continue
            has_final = final_grad is not None and final_index in seg.checkpoints
            others = [c for c in seg.checkpoints if not (has_final and c == final_index)]
            if others:
                sums[:, l] += self._projected_sum(others, self.task.loss, inputs, targets)
            if final_grad is not None and has_final:
                sums[:, l] += final_grad
        counts = torch.tensor([len(s.checkpoints) for s in self.segments], dtype=torch.float64, device=self.device)
        seg_grads = sums / counts[None, :, None]
        per_segment = segment_features(seg_grads, operators, weights).cpu()
        features = self.query_form.combine(per_segment)
        own = self.query_form.own_gradients(None if final_grad is None else final_grad.cpu(), seg_grads.cpu())
        self_inf = row_dot(own, features)
        return RowFeatures(features, per_segment if self.keeps_segment_features else None, self_inf)

    @_one_reading
    def featurize_range(self, examples: Examples, start: int, stop: int, progress: bool = False) -> RowFeatures:
        """Features of training rows [start, stop), computed ``chunk_size`` rows at a time."""
        step = self.chunk_size
        parts = [
            self.featurize_rows(examples, s, min(stop, s + step))
            for s in self._chunks(stop, "features", start, show=progress)
        ]
        if not parts:
            k, n_seg = self.proj_dim, self.num_segments
            width = self.query_form.feature_width(k)
            segments = torch.zeros(0, n_seg, k) if self.keeps_segment_features else None
            return RowFeatures(torch.zeros(0, width), segments, torch.zeros(0, dtype=torch.float64))
        # every part has its segment features when they are kept
        kept = [p.segment_features for p in parts if p.segment_features is not None]
        segments = torch.cat(kept) if self.keeps_segment_features else None
        return RowFeatures(
            torch.cat([p.features for p in parts]), segments, torch.cat([p.self_influence for p in parts])
        )

    def _rank_rows(self, n: int) -> tuple[int, int]:
        """This rank's rows [start, stop) of ``n``: a contiguous share of the ``chunk_size``
        chunks (all of them in a single process)."""
        chunks, step = self.group.span(-(-n // self.chunk_size)), self.chunk_size
        return min(n, chunks.start * step), min(n, chunks.stop * step)

    @_one_reading
    def fit(
        self,
        train_data: Any,
        *,
        store: str | os.PathLike | None = None,
        dtype: str = "float32",
        chunk_rows: int = 4096,
        stages: Sequence[Hashable] | None = None,
        num_train: int | Mapping[Hashable, int] | None = None,
        curvature_data: Any = None,
    ) -> SourceAttributor:
        """Compute the features of every training row (see :meth:`prepare` for ``stages``,
        ``num_train`` and ``curvature_data``), in memory, or with ``store`` (a directory) in a
        feature store written chunk by chunk: created, or resumed where an interrupted fit
        stopped (``dtype`` "float32" or "float16", ``chunk_rows`` rows per chunk; see
        ``store_fit.fit_store`` for what is checked first). Either way :meth:`score`,
        :meth:`topk`, :meth:`self_influence` and :meth:`group_influence` then read them through
        :attr:`features`.

        Under ``torch.distributed`` each rank featurises a share of the rows and every rank
        ends with all of them (the same as one process would compute)."""
        if store is not None:
            self.features, _ = fit_store(self, train_data, store, dtype=dtype, chunk_rows=chunk_rows, stages=stages,
                                         num_train=num_train, curvature_data=curvature_data)
            return self
        examples = as_examples(train_data)
        self.check_training_data(examples)
        self.prepare(examples, stages=stages, num_train=num_train, curvature_data=curvature_data)
        with together(self.group, "featurisation"):
            rows = self.featurize_range(examples, *self._rank_rows(len(examples)), progress=True)
        self.train_features = gather_rows(self.group, rows.features)
        self.train_segment_features = (
            None if rows.segment_features is None else gather_rows(self.group, rows.segment_features)
        )
        self._self_influence = gather_rows(self.group, rows.self_influence)
        self.features = MemoryFeatures(self.train_features, self.train_segment_features, self._self_influence)
        return self

    def use_store(self, path: str | os.PathLike) -> SourceAttributor:
        """Answer queries from the complete feature store at ``path``, after checking that it
        was made with this model, trajectory and settings (``StoreMismatchError`` otherwise)."""
        self.features = open_store(self, path)
        return self

    def _source(self) -> FeatureSource:
        if self.features is None:
            raise RuntimeError("call fit() (or use_store()) before scoring")
        return self.features

    # ----------------------------------------------------------------- queries
    @_one_reading
    def query_features(
        self, queries: Any, measurement: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Q, (n_query, D) float32, such that score = Q @ F^T.

        ``measurement`` overrides the task's (e.g. the task's loss): (B, C), (B, ...) -> (B,).
        Under ``torch.distributed`` the ranks share the queries and every rank gets all of Q.
        The features of the last queries measured by the task's measurement are kept (by a
        digest of their rows), so scoring them again after another fit (e.g. of the next
        stage's rows) does not compute them again.
        """
        examples = as_examples(queries, "queries")
        key = None if measurement is not None else (examples_digest(examples), repr(describe(self.projection)))
        if key is not None and self._last_queries is not None and self._last_queries[0] == key:
            return self._last_queries[1].clone()
        # As training rows: labels, input shapes (one query's activations need no measuring).
        self.check_training_data(examples, what="queries", measure=len(examples) > 1)
        measure = measurement or self.task.measurement
        groups: list[tuple[int, ...]]
        groups = self.query_form.query_checkpoints(self.segments, len(self.trajectory.checkpoints))
        start, stop = self._rank_rows(len(examples))
        parts = [torch.zeros(0, len(groups) * self.proj_dim)]
        with together(self.group, "query features"):
            for s in self._chunks(stop, "queries", start):
                end = min(stop, s + self.chunk_size)
                inputs, targets = examples.rows(s, end, self.device)
                with dataset_rows(range(s, end)):  # a group can recur (the staged form's final checkpoint)
                    per_group = {g: -self._projected_sum(g, measure, inputs, targets) / len(g) for g in dict.fromkeys(groups)}
                parts.append(torch.cat([per_group[g] for g in groups], dim=1).cpu())
        features = gather_rows(self.group, torch.cat(parts))
        if key is not None:
            self._last_queries = (key, features.clone())
        return features

    def stage_segments(self, stage: Hashable) -> list[int]:
        """Indices of the segments of training stage ``stage``: its label, or the label's text
        (as given on a command line)."""
        chosen = [i for i, seg in enumerate(self.segments) if seg.stage == stage or str(seg.stage) == str(stage)]
        if not chosen:
            raise TrajectoryError(f"unknown stage {stage!r}; the trajectory has stages {list(self.trajectory.stages)}")
        return chosen

    def score(self, queries: Any, *, stage: Hashable | None = None) -> torch.Tensor:
        """Scores (n_query, N) float32: predicted change of each query's measurement at the
        final model when the training row is included (> 0: proponent for a margin).

        ``stage`` keeps only the terms of that stage's segments (later segments still act
        through their exp(-tH) factors). From a store the rows are read block by block; the
        (n_query, N) result must fit in memory (``retrieval.bulk.score_matrix`` writes it to
        disk instead).
        """
        source = self._source()
        if isinstance(source, MemoryFeatures) and stage is None:
            return self.query_features(queries) @ source.features.T
        q, segments = self._restricted_queries(queries, stage)
        blocks = [torch.from_numpy(q) @ torch.from_numpy(rows).T for _, rows in source.iter_blocks(16384, segments)]
        return torch.cat(blocks, dim=1)

    def _restricted_queries(self, queries: Any, stage: Hashable | None) -> tuple[np.ndarray, list[int] | None]:
        """Query features as float32 numpy, and the stored segments to read for ``stage``."""
        q = self.query_features(queries).numpy()
        if stage is None:
            return q, None
        stored = self._source().n_segments > 0
        return self.query_form.restrict_queries(q, self.stage_segments(stage), stored)

    def topk(
        self, queries: Any, k: int, *, kind: str = "both", stage: Hashable | None = None, progress: bool | None = None
    ) -> TopK | tuple[TopK, TopK]:
        """The exact top ``k`` training rows per query: ``kind`` "proponents" (largest scores),
        "opponents" (most negative) or "both" (a ``(proponents, opponents)`` pair from one
        pass). Each a ``TopK`` with ``ids`` (n_query, k) row indices and ``scores``, best first,
        equal scores by ascending row. ``stage`` as in :meth:`score`."""
        if kind not in ("proponents", "opponents", "both"):
            raise InputError(f"kind must be 'proponents', 'opponents' or 'both', got {kind!r}")
        source = self._source()
        q, segments = self._restricted_queries(queries, stage)
        shown = self.config.progress if progress is None else progress
        if kind == "both":
            return exact_proponents_opponents(source, q, k, segments=segments, progress=shown)
        return exact_topk(source, q, k, opponents=kind == "opponents", segments=segments, progress=shown)

    def group_influence(self, queries: Any, *, weights: np.ndarray | None = None, stage: Hashable | None = None) -> np.ndarray:
        """(N,) float64: each training row's summed score over the queries (weighted by
        ``weights``), without forming the score matrix (``retrieval.group``)."""
        q, segments = self._restricted_queries(queries, stage)
        return group_influence(self._source(), q, weights=weights, segments=segments, progress=self.config.progress)

    def self_influence(self) -> torch.Tensor:
        """(N,) float64: each row's predicted effect on its own loss, sign flipped so that
        larger means more self-reliant (``-score`` with the row as a loss query)."""
        if self._self_influence is not None:
            return self._self_influence
        return torch.from_numpy(self._source().self_influence())

    def metadata(self) -> dict:
        """JSON-serialisable description of everything the features depend on."""
        cfg = self.config
        return {
            "projection": {
                **describe(self.projection),
                **({"segment_seeds": [describe(p)["seed"] for p in self.projections]} if self.config.segment_projections else {}),
            },
            "model_fingerprint": self.model_fn.fingerprint(),
            "num_params": self.model_fn.num_params(),
            "task": self.task.name,
            "trajectory": self.trajectory.summary(),
            "checkpoint_digests": self.checkpoint_digests,
            # Adam runs: what the preconditioner was read from (a store built with other states is refused).
            **({"optimizer_state_digests": list(self.preconditioner.digests)} if self.trajectory.preconditioned else {}),
            "segments": [
                {"stage": str(s.stage), "checkpoints": list(s.checkpoints), "steps": s.steps, "lr": s.lr, "time": s.time}
                for s in self.segments
            ],
            "estimator": {
                "num_segments": cfg.num_segments,
                "curvature": self.curvature,
                "curvature_examples": cfg.curvature_examples,
                "momentum_factor": cfg.momentum_factor,
                "time_scale": cfg.time_scale,
                "query_mode": self.query_mode,
            },
            "stages": [str(s) for s in self.stages],
            "segment_weights": [] if self.weights is None else self.weights.tolist(),
        }
