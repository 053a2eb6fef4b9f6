"""How much memory per-example gradients take, and how many examples fit a budget.

``SourceConfig(max_gradient_memory=...)`` bounds, for a chunk of B examples:

* the per-example gradient buffers, p float32 values per row (p = attributed parameters, or
  for the factored projection the parameters not factored plus the factored blocks'
  coordinates), at every checkpoint: for features and queries 2 B p x 4 bytes (a segment's
  running sum over its checkpoints and one checkpoint's gradients); for curvature B R p x 4
  bytes, R = factor rows per example (1 sampled, or 2 for a custom task's Hessian-vector
  form; C exact: classes, T x V for a language model), plus the factor itself, B C R x 8 bytes;
* the activations of the B examples: what the model's forward and the task's loss save for
  the backward pass, plus the model's output, **measured** for the model and the rows' shapes
  (``gradients.activations.activation_cost``: a forward on one and on two copies of the first row under
  ``torch.autograd.graph.saved_tensors_hooks``, counting each saved storage once) as a
  per-example slope and a fixed part.

``chunk_size`` is chosen from the budget when not given (at most ``DEFAULT_MAX_CHUNK``), an
explicit ``chunk_size`` over it is refused, curvature chunks are split into as many backward
batches as the budget needs, and a single example that does not fit is refused before any
pass runs (the error names the gradient and the activation parts).

Not counted (the stated overhead, measured in benchmarks/results/memory-budget-2026-12-06.md):

* the parameters and the checkpoint being read, the data rows, the feature store's chunk
  buffers (``store_fit.check_chunk_memory``), the projection's tiles (a few MiB);
* the CPU projection's matrix cache (``projection.jl.MATRIX_CACHE``, at most 1 GiB by
  default): the dense projection keeps its p x k matrix there when it fits (p k / 8 bytes for
  Rademacher entries), e.g. 292 MiB for 10M parameters at k = 256;
* memory the allocator keeps after it is freed: with glibc's default settings a factored
  fit's peak resident memory grew by 1.3-1.5 x the budget (with freed blocks returned, by the
  count, within 2 %); ``MALLOC_MMAP_THRESHOLD_=65536`` in the environment returns them at once.

The activations are measured with plain autograd (``torch.func`` refuses saved-tensor hooks);
``vmap`` over B examples holds B times one example's tensors (checked against peak resident
memory in the benchmark, within 4 %). Measured on the first row: rows of another shape
(padded batches) are measured again when their shape is met at the start of a pass. The
count takes every attributed weight's gradient, so it is an upper bound for the factored
projection, whose weights are held constant (its hooks' projected sides, a few k-wide floats
per token, are not counted).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from source_proj.errors import InputError

FLOAT_BYTES = 4
DEFAULT_MAX_CHUNK = 256
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class MemoryBudgetError(InputError):
    """The gradients of one example (or of the requested chunk) exceed the memory budget."""


def parse_bytes(value: int | str) -> int:
    """Bytes from an int or a string such as "4GiB", "512MB", "1.5 GB" (powers of 1024 for
    KiB/MiB/GiB/TiB, of 1000 for KB/MB/GB/TB)."""
    if isinstance(value, bool):
        raise InputError(f"a memory size must be an int or a string like '4GiB', got {value!r}")
    if isinstance(value, int):
        number = float(value)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if match is None or match.group(2).lower() not in _UNITS:
            raise InputError(f"cannot read the memory size {value!r}; write e.g. '4GiB' or '512MB'")
        number = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if number < 1:
        raise InputError(f"a memory size must be at least 1 byte, got {value!r}")
    return int(number)


@dataclass(frozen=True)
class ActivationCost:
    """Bytes the activations of a batch take: ``fixed + batch x per_example``.

    Attributes:
        per_example: bytes each example adds (tensors saved for the backward pass, and the
            model's output).
        fixed: bytes saved whatever the batch size (tensors derived from the parameters alone).
    """

    per_example: int = 0
    fixed: int = 0

    def of(self, batch: int) -> int:
        """Bytes for ``batch`` examples."""
        return self.fixed + batch * self.per_example


NO_ACTIVATIONS = ActivationCost()


def _advice(num_params: int) -> str:
    return (
        f"raise max_gradient_memory, or attribute through fewer than the {num_params:,} parameters "
        "(param_names=['transformer.h.*.mlp.*', 'lm_head'] style patterns)"
    )


def _parts(gradients: str, activations: ActivationCost, batch: int) -> str:
    """The two parts of a need, for messages: ``gradients`` (their bytes and formula) and the
    activations of ``batch`` examples."""
    return (
        f"{gradients} and {activations.of(batch):,} bytes of activations ({batch} x {activations.per_example:,} "
        f"measured per example + {activations.fixed:,} fixed)"
    )


def feature_chunk(
    num_params: int, budget: int, chunk_size: int | None, activations: ActivationCost = NO_ACTIVATIONS
) -> int:
    """Examples per feature/query chunk: ``chunk_size`` if its 2 B p x 4 bytes of gradient
    buffers and its activations fit ``budget`` (else MemoryBudgetError), or the most that fit,
    at most ``DEFAULT_MAX_CHUNK``."""
    per_row = 2 * num_params * FLOAT_BYTES
    if chunk_size is not None:
        if chunk_size * per_row + activations.of(chunk_size) > budget:
            raise MemoryBudgetError(
                f"chunk_size={chunk_size} needs " + _parts(
                    f"{chunk_size * per_row:,} bytes of per-example gradients (2 x {chunk_size} rows x "
                    f"{num_params:,} parameters x 4 bytes)", activations, chunk_size
                ) + f", over max_gradient_memory={budget:,} bytes: lower chunk_size or {_advice(num_params)}"
            )
        return chunk_size
    fits = (budget - activations.fixed) // (per_row + activations.per_example)
    if fits < 1:
        raise MemoryBudgetError(
            "one example's " + _parts(
                f"per-example gradients need {per_row:,} bytes (2 x {num_params:,} parameters x 4 bytes)", activations, 1
            ) + f", over max_gradient_memory={budget:,} bytes: {_advice(num_params)}"
        )
    return int(min(DEFAULT_MAX_CHUNK, fits))


def curvature_batch(
    num_params: int, outputs: int, factor_rows: int, budget: int, activations: ActivationCost = NO_ACTIVATIONS
) -> int:
    """Examples per backward batch of the curvature pass: the most whose factor rows
    (R p x 4 bytes each), factor (C R x 8 bytes) and activations fit ``budget``;
    MemoryBudgetError if one example does not fit."""
    per_example = factor_rows * (num_params * FLOAT_BYTES + outputs * 8)
    fits = (budget - activations.fixed) // (per_example + activations.per_example)
    if fits < 1:
        raise MemoryBudgetError(
            "the curvature pass needs, per example, " + _parts(
                f"{per_example:,} bytes of factor rows ({factor_rows:,} Gauss-Newton factor rows x {num_params:,} "
                "parameters x 4 bytes, and the factor)", activations, 1
            ) + f", over max_gradient_memory={budget:,} bytes: use curvature='sampled' (one row per example) or "
            f"{_advice(num_params)}"
        )
    return int(fits)
