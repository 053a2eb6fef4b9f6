"""Settings of a SOURCE attribution run (frozen dataclasses)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from source_proj.errors import InputError
from source_proj.gradients.memory import parse_bytes
from source_proj.projection.options import (
    AUTO_DENSE_MAX_PARAMS,
    AUTO_GROUPED_MAX_PARAMS,
    CURVATURE_MODES,
    STRUCTURES,
    auto_curvature_blocks,
)

if TYPE_CHECKING:
    from source_proj.projection.jl import ProjectionConfig

QUERY_MODES = ("auto", "final", "segment", "staged")
CURVATURE_BLOCKS = ("auto", "full", "layer")


def _setting(
    default: Any,
    help: str,
    *,
    group: str = "estimator",
    recorded: bool = True,
    flag: str | None = None,
    kind: str = "choice",
    choices: tuple[str, ...] | None = None,
    added: bool = False,
    legacy: Any = None,
) -> Any:
    """A ``SourceConfig`` field and what the rest of the package derives from it.

    Args:
        default: the field's default.
        help: one line for the command line's help (the default is appended there).
        group: "projection" (how gradients are compressed), "estimator" (how SOURCE turns them
            into scores) or, for settings that are not recorded, "runtime" (where and how fast).
        recorded: whether the setting changes the features: recorded in stores and checked
            when one is reopened (False: how, not what, is computed; overridable at query time).
        flag: the command-line flag of ``source-proj fit`` (None: not on the command line).
        kind: how the flag parses: "positive" (int >= 1), "int", "choice" (one of
            ``choices``) or "flag" (on when given).
        added: added after stores were first written: recorded only when it differs from
            ``legacy``, so that older stores keep opening.
        legacy: what stores written before an added setting existed did (None: its default).
    """
    return field(default=default, metadata={
        "help": help, "group": group if recorded else "runtime", "recorded": recorded, "flag": flag, "kind": kind,
        "choices": choices, "added": added, "legacy": default if legacy is None else legacy,
    })


@dataclass(frozen=True)
class SourceConfig:
    """How SOURCE is evaluated.

    Attributes:
        proj_dim: k, the projected dimension (with ``proj_structure="factored"``, the total
            shared out among the layers).
        seed: seed of the random projection (and of sampled curvature).
        proj_kind: "rademacher" or "gaussian" projection entries.
        proj_structure: "dense" (every per-example gradient is formed and projected by one
            i.i.d. matrix), "factored" (weights of ``nn.Linear``, ``nn.Embedding`` and GPT-2
            ``Conv1D`` layers projected by Kronecker factors through hooks, their gradients
            never formed; other parameters dense; see ``projection.kronecker``), "grouped"
            (gradients formed as for dense, each layer projected by its own i.i.d. matrix, k
            shared among layers by their measured gradient energy; ``projection.grouped``) or "auto"
            (default): for a model with embedding tables (a language model, a transformer)
            "grouped" up to 10M attributed parameters, where it costs at most about 3x the
            factored pass and was 0.01-0.07 LDS more accurate; for other models "dense" up to
            100,000, where it costs at most about 4x the factored pass and is 0.02-0.17 LDS
            more accurate; either at any size when the factorable weights are under half the
            parameters; "factored" otherwise (``projection.options.auto_structure``,
            docs/settings.md). The attributor resolves it per model, and stores record the
            resolved structure.
        kronecker_terms: r, Kronecker products summed per factored weight (1..256; default 4):
            r = 1 is the plain Kronecker projection; larger r brings its error towards an
            i.i.d. projection's at r times the cost of the factored products, which is small
            next to the model's forward and backward (4 terms: as fast as 1 on GPT-2 shapes,
            half the LDS gap to dense on the MLP scenarios; docs/guides/factored.md).
        backend: "auto", "cpu" or "triton" for the projection.
        proj_precision: "highest" or "tf32" (faster Triton products of float32 gradients at
            ~4e-4 relative error; see ``ProjectionConfig``).
        num_segments: L, segments per training stage.
        curvature: "exact" Gauss-Newton (C factor rows per example), "sampled" (one
            pseudo-label per example, per position for language models; unbiased, cheaper
            for many outputs), or "auto" (default): the task's ``default_curvature``
            ("sampled" for ``CausalLMTask``, "exact" otherwise).
        curvature_examples: examples per checkpoint used for the Hessian (None: all of the
            stage's curvature data; otherwise a fixed seeded subset).
        curvature_blocks: "full" (each segment's k x k Hessian as it is), "layer" (restricted
            to one diagonal block per layer of the factored or grouped projection's split, each
            block eigendecomposed on its own: ``projection.projected.layer_groups``; not with
            the dense projection, whose coordinates mix the layers), or "auto" (default):
            "layer" for a model with embedding tables under the factored or grouped projection,
            "full" otherwise (``projection.options.auto_curvature_blocks``). On the LM
            benchmark the blocks gained LDS (factored: +0.074, -0.005, +0.099 against "full";
            grouped: +0.006, +0.041, +0.064), on the MLP scenarios they lost on three of six
            (docs/settings.md, "Why the defaults"); stores record the resolved value.
        momentum_factor: time scale t = eta K with eta / (1 - beta) under heavy-ball
            momentum. Adam's beta1 is not a time factor (its bias-corrected first moment
            weights past gradients by weights summing to 1; measured: multiplying t by
            1 / (1 - beta1) lowers the LDS, see docs/guides/adam.md), so Adam runs use t = eta K.
        time_scale: multiplies every segment's t (1.0 is the paper's value).
        query_mode: "final" (the paper's form: the query gradient at the final checkpoint,
            transported through later segments), "segment" (query gradients averaged over
            each segment's own checkpoints, no transport; features are L*k wide), "staged"
            (per segment within the last training stage, final for the earlier stages;
            (L_last + 1)*k wide), or "auto" (default): "segment" for single-stage training,
            "staged" for multi-stage runs. The LDS benchmarks chose this (see
            docs/settings.md, "Why the defaults").
        keep_segment_features: keep per-segment training features (needed for per-stage
            attribution in "final" mode, and in "staged" mode for some but not all of the
            stages before the last; always kept in "segment" mode).
        segment_projections: project segment l with its own matrix, of seed ``seed + l``
            (mod 2^64), instead of one matrix for all (per-segment query form only: the
            paper's form carries query gradients across segments). The segments' JL errors
            are then independent and partly cancel in the sum over segments, at the same k
            and storage (docs/guides/adam.md). Off by default; stores record it.
        chunk_size: examples per vmap batch (None: the most that ``max_gradient_memory``
            allows, at most 256). Per-example gradients are summed over a segment's
            checkpoints before projection, so two chunk x p float32 buffers (the running sum
            and one checkpoint's gradients). Larger chunks project faster per row.
        max_gradient_memory: bytes (or "4GiB"-style text) that per-example gradient buffers
            and the chunk's activations may take: 2 x chunk x p x 4 for features, chunk x R x
            p x 4 for R curvature factor rows per example, plus the activations the model and
            loss keep for the backward pass, measured for the model on the data's first row
            (see ``gradients.memory``, which also states what is not counted: parameters,
            checkpoints, projection tiles). An explicit ``chunk_size`` over it, or one example
            over it, is refused before any work.
        device: where gradients are computed (None: the model's device).
        progress: show one progress bar per pass (curvature, features, queries, search).
        verbose: also show the bars nested inside a pass (each checkpoint's curvature chunks).
    """

    proj_dim: int = _setting(1024, "projection dimension k (factored: the total shared out among the layers)",
                             flag="--proj-dim", kind="positive", group="projection")
    seed: int = _setting(0, "seed of the random projection (and of sampled curvature)", flag="--seed", kind="int",
                         group="projection")
    proj_kind: str = _setting("rademacher", "projection entries", flag="--proj-kind", choices=("rademacher", "gaussian"),
                              group="projection")
    proj_structure: str = _setting(
        "auto", "dense: every per-example gradient formed and projected; factored: linear, embedding and GPT-2 "
        "Conv1D weights projected by Kronecker factors without forming their gradients; grouped: as dense, one "
        "matrix per layer with k shared by gradient energy; auto: grouped for models with embedding tables of at "
        f"most {AUTO_GROUPED_MAX_PARAMS:,} parameters, dense for others of at most {AUTO_DENSE_MAX_PARAMS:,} (either "
        "when mostly of other layers), factored otherwise",
        flag="--proj-structure", choices=("auto", *STRUCTURES), group="projection")
    kronecker_terms: int = _setting(4, "Kronecker products summed per factored weight (more: closer to dense accuracy)",
                                    flag="--kronecker-terms", kind="positive", group="projection")
    backend: str = _setting("auto", "projection backend: auto, cpu or triton", recorded=False)
    proj_precision: str = _setting("highest", "GPU products of float32 gradients: highest, or tf32 (faster, ~4e-4 relative)",
                                   flag="--proj-precision", choices=("highest", "tf32"), group="projection")
    num_segments: int = _setting(3, "segments per training stage, L", flag="--num-segments", kind="positive")
    curvature: str = _setting("auto", "Gauss-Newton Hessian: exact, or with sampled labels (cheaper for many outputs); "
                              "auto: the task's choice", flag="--curvature", choices=("auto", *CURVATURE_MODES))
    curvature_examples: int | None = _setting(None, "training rows per checkpoint for the Hessian (default: all)",
                                              flag="--curvature-examples", kind="positive")
    curvature_blocks: str = _setting(
        "auto", "segment Hessians whole (full) or one block per layer of the factored or grouped projection "
        "(layer); auto: layer for models with embedding tables under those projections, full otherwise",
        flag="--curvature-blocks", choices=CURVATURE_BLOCKS, added=True, legacy="full",
    )
    momentum_factor: bool = _setting(True, "scale segment time by 1 / (1 - momentum) under heavy-ball momentum")
    time_scale: float = _setting(1.0, "multiplies every segment's time eta K")
    query_mode: str = _setting(
        "auto", "query gradients at the final checkpoint, transported (final: the paper's form), averaged per "
        "segment (segment), or per segment within the last stage and final for earlier stages (staged); "
        "auto: segment for one training stage, staged for several", flag="--query-mode", choices=QUERY_MODES,
    )
    keep_segment_features: bool = _setting(False, "also store per-segment features (for --stage in score and topk)",
                                           flag="--keep-segments", kind="flag")
    segment_projections: bool = _setting(
        False, "project each segment with its own matrix (seed + segment index): independent JL errors per segment, "
        "at the same k (per-segment query form only)", flag="--segment-projections", kind="flag", added=True, group="projection",
    )
    chunk_size: int | None = _setting(None, "examples per gradient batch (memory vs speed; default: what "
                                      "max_gradient_memory allows, at most 256)", recorded=False, flag="--batch-size",
                                      kind="positive")
    max_gradient_memory: int | str = _setting("4GiB", "memory that per-example gradient buffers and activations may take",
                                                recorded=False)
    device: str | None = _setting(None, "where gradients are computed (default: the model's device)", recorded=False)
    progress: bool = _setting(True, "progress bars, one per pass", recorded=False)
    verbose: bool = _setting(False, "also the progress bars nested inside a pass", recorded=False)

    def __post_init__(self) -> None:
        self.projection()  # validates proj_dim, seed, kind, backend, precision
        if self.proj_structure not in ("auto", *STRUCTURES):
            raise InputError(f"proj_structure must be one of {('auto', *STRUCTURES)}, got {self.proj_structure!r}")
        if isinstance(self.kronecker_terms, bool) or not isinstance(self.kronecker_terms, int) or not 1 <= self.kronecker_terms <= 256:
            raise InputError(f"kronecker_terms must be an int in [1, 256], got {self.kronecker_terms!r}")
        if self.curvature not in ("auto", *CURVATURE_MODES):
            raise InputError(f"curvature must be one of {('auto', *CURVATURE_MODES)}, got {self.curvature!r}")
        if self.curvature_blocks not in CURVATURE_BLOCKS:
            raise InputError(f"curvature_blocks must be one of {CURVATURE_BLOCKS}, got {self.curvature_blocks!r}")
        if self.query_mode not in QUERY_MODES:
            raise InputError(f"query_mode must be one of {QUERY_MODES}, got {self.query_mode!r}")
        if not (math.isfinite(self.time_scale) and self.time_scale > 0):
            raise InputError(f"time_scale must be finite and > 0, got {self.time_scale}")
        if self.chunk_size is not None and (isinstance(self.chunk_size, bool) or self.chunk_size < 1):
            raise InputError(f"chunk_size must be >= 1 or None, got {self.chunk_size}")
        parse_bytes(self.max_gradient_memory)
        if self.curvature_examples is not None and self.curvature_examples < 1:
            raise InputError(f"curvature_examples must be >= 1 or None, got {self.curvature_examples}")

    def resolved_query_mode(self, num_stages: int) -> str:
        """``query_mode`` with "auto" resolved for a run of ``num_stages``: "segment" for one
        stage, "staged" for several (which is the per-segment form within the last stage and
        the final form for the earlier ones; ``features.query_forms``)."""
        if self.query_mode != "auto":
            return self.query_mode
        return "segment" if num_stages == 1 else "staged"

    def resolved_curvature(self, default: str) -> str:
        """"exact" or "sampled": ``curvature`` with "auto" resolved to the task's ``default``."""
        return default if self.curvature == "auto" else self.curvature

    def resolved_curvature_blocks(self, structure: str, embeddings: bool) -> str:
        """"full" or "layer": ``curvature_blocks`` with "auto" resolved for the projection
        ``structure`` (one of ``STRUCTURES``) of a model with attributed embedding tables or
        not (``projection.options.auto_curvature_blocks``); "layer" needs a projection whose
        coordinates belong to layers (not "dense")."""
        blocks = self.curvature_blocks
        if blocks == "auto":
            return auto_curvature_blocks(structure, embeddings)
        if blocks == "layer" and structure == "dense":
            raise InputError(
                "curvature_blocks='layer' needs proj_structure='factored' or 'grouped' (their layers are the blocks); "
                "this model's projection is 'dense', whose coordinates mix every layer: use curvature_blocks='full' "
                "or 'auto', or proj_structure='grouped'"
            )
        return blocks

    def recorded_settings(self) -> dict[str, Any]:
        """The settings that determine the features, as stores record them (JSON-serialisable):
        every recorded field, an added one only when it differs from what older stores did."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.metadata["recorded"] and not (f.metadata["added"] and getattr(self, f.name) == f.metadata["legacy"])
        }

    def gradient_budget(self) -> int:
        """``max_gradient_memory`` in bytes."""
        return parse_bytes(self.max_gradient_memory)

    def projection(self) -> ProjectionConfig:
        """The projection settings."""
        # Imported here: the command line builds its flags from this class without loading torch.
        from source_proj.projection.jl import ProjectionConfig

        return ProjectionConfig(
            dim=self.proj_dim,
            seed=self.seed,
            kind=self.proj_kind,
            backend=self.backend,
            precision=self.proj_precision,
        )


# Settings that change how, not what, is computed: never recorded, overridable for queries.
RUNTIME_FIELDS = tuple(f.name for f in dataclasses.fields(SourceConfig) if not f.metadata["recorded"])
