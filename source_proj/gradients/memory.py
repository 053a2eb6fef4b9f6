"""How much memory per-example gradients take, and how many fit a budget.

Per-example gradients are p float32 values per row (p = attributed parameters), at every
checkpoint. The buffers, for a chunk of B examples:

* features and queries: 2 B p x 4 bytes (a segment's running sum over its checkpoints and one
  checkpoint's gradients);
* curvature: B R p x 4 bytes, R = factor rows per example (1 sampled, or 2 for a custom
  task's Hessian-vector form; C exact: classes, T x V for a language model), plus the
  factor itself, B C R x 8 bytes.

``SourceConfig(max_gradient_memory=...)`` bounds these buffers: ``chunk_size`` is chosen from
it when not given (at most ``DEFAULT_MAX_CHUNK``), an explicit ``chunk_size`` over it is
refused, and curvature chunks are split into as many backward batches as the budget needs;
a single example that does not fit is refused before anything runs. Not counted: the
model's activations for B examples under ``vmap`` (forward and backward; for a transformer
about B x layers x T x width x a small constant floats), the parameters and checkpoints
themselves, and the projection's tiles (a few MiB).
"""

from __future__ import annotations

import re

from source_proj.errors import InputError

FLOAT_BYTES = 4
DEFAULT_MAX_CHUNK = 64
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


def _advice(num_params: int) -> str:
    return (
        f"raise max_gradient_memory, or attribute through fewer than the {num_params:,} parameters "
        "(param_names=['transformer.h.*.mlp.*', 'lm_head'] style patterns)"
    )


def feature_chunk(num_params: int, budget: int, chunk_size: int | None) -> int:
    """Examples per feature/query chunk: ``chunk_size`` if its 2 B p x 4 bytes fit ``budget``
    (else MemoryBudgetError), or the most that fit, at most ``DEFAULT_MAX_CHUNK``."""
    per_row = 2 * num_params * FLOAT_BYTES
    if chunk_size is not None:
        if chunk_size * per_row > budget:
            raise MemoryBudgetError(
                f"chunk_size={chunk_size} needs {chunk_size * per_row:,} bytes of per-example gradients "
                f"(2 x {chunk_size} rows x {num_params:,} parameters x 4 bytes), over max_gradient_memory="
                f"{budget:,} bytes: lower chunk_size or {_advice(num_params)}"
            )
        return chunk_size
    fits = budget // per_row
    if fits < 1:
        raise MemoryBudgetError(
            f"one example's per-example gradients need {per_row:,} bytes (2 x {num_params:,} parameters "
            f"x 4 bytes), over max_gradient_memory={budget:,} bytes: {_advice(num_params)}"
        )
    return int(min(DEFAULT_MAX_CHUNK, fits))


def curvature_batch(num_params: int, outputs: int, factor_rows: int, budget: int) -> int:
    """Examples per backward batch of the curvature pass: the most whose factor rows
    (R p x 4 bytes each) and factor (C R x 8 bytes) fit ``budget``; MemoryBudgetError if
    one example does not fit."""
    per_example = factor_rows * (num_params * FLOAT_BYTES + outputs * 8)
    fits = budget // per_example
    if fits < 1:
        raise MemoryBudgetError(
            f"the curvature pass needs {per_example:,} bytes per example ({factor_rows:,} Gauss-Newton factor "
            f"rows x {num_params:,} parameters x 4 bytes), over max_gradient_memory={budget:,} bytes: use "
            f"curvature='sampled' (one row per example) or {_advice(num_params)}"
        )
    return int(fits)
