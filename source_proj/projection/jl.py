"""Johnson-Lindenstrauss projection of (per-example) gradients, dispatched by device.

``project(grads, config)`` returns ``grads @ R / sqrt(k)`` where R is the seeded random matrix
defined in ``source_proj.kernels.reference`` (see that module for the exact layout). CUDA
tensors go to the Triton kernel (``kernels.triton_projection``), CPU tensors to the CPU path
(``kernels.cpu_projection``); both compute the same matrix.
Gradients may come as one (B, p) tensor or as a dict/sequence of per-parameter (B, p_b)
blocks whose rows continue the global row index, so nothing is concatenated.

The CPU path generates each matrix once and keeps it in ``MATRIX_CACHE`` (bounded, least
recently used; ``MATRIX_CACHE.set_limit(n_bytes)``, 0 to disable), so projecting many blocks
of rows with one config pays the generation once; results are bit-identical either way.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from source_proj.errors import InputError
from source_proj.kernels.cpu_projection import MATRIX_CACHE, project_cpu
from source_proj.kernels.reference import KINDS, PRECISIONS, RADEMACHER, check_seed

__all__ = ["BACKENDS", "MATRIX_CACHE", "GradientBlocks", "ProjectionConfig", "project"]

BACKENDS = ("auto", "cpu", "triton")
GradientBlocks = torch.Tensor | Mapping[str, torch.Tensor] | Sequence[torch.Tensor]


@dataclass(frozen=True)
class ProjectionConfig:
    """Settings of the random projection.

    Attributes:
        dim: k, the projected dimension (>= 1).
        seed: seed of the random matrix, an int in [0, 2^64).
        kind: "rademacher" (entries +-1/sqrt(k), default) or "gaussian" (N(0, 1/k)).
        backend: "auto" (Triton for CUDA tensors, CPU path otherwise), "cpu" or "triton".
        precision: "highest" (default: float32 accuracy or better) or "tf32": float32
            gradients through one tf32 tensor-core product in the Triton kernel, ~1.35x faster
            at ~4e-4 relative error. The CPU path always runs at "highest".
    """

    dim: int
    seed: int = 0
    kind: str = RADEMACHER
    backend: str = "auto"
    precision: str = "highest"

    def __post_init__(self) -> None:
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise InputError(f"proj_dim must be a positive int, got {self.dim!r}")
        check_seed(self.seed)
        if self.kind not in KINDS:
            raise InputError(f"unknown projection kind {self.kind!r}; expected one of {KINDS}")
        if self.backend not in BACKENDS:
            raise InputError(f"unknown projection backend {self.backend!r}; expected one of {BACKENDS}")
        if self.precision not in PRECISIONS:
            raise InputError(f"unknown projection precision {self.precision!r}; expected one of {PRECISIONS}")


def _as_blocks(grads: GradientBlocks) -> list[torch.Tensor]:
    if isinstance(grads, torch.Tensor):
        blocks = [grads]
    elif isinstance(grads, Mapping):
        blocks = list(grads.values())
    else:
        blocks = list(grads)
    if not blocks:
        raise InputError("no gradient blocks to project")
    batch = blocks[0].shape[0] if blocks[0].dim() > 0 else None
    for b in blocks:
        if b.dim() != 2 or b.shape[0] != batch:
            raise InputError(
                "gradient blocks must be 2-D (batch, p_b) with one batch size; got shapes "
                f"{[tuple(x.shape) for x in blocks]}"
            )
        if b.device != blocks[0].device:
            raise InputError("gradient blocks must all be on one device")
    return blocks


def _triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernel cannot run on ``device``, or None when it can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton, or use backend='cpu')"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (
        f"the gradients are on {device.type!r}; the Triton kernel runs on CUDA tensors, or on "
        "CPU tensors only under TRITON_INTERPRET=1 (set before triton is imported)"
    )


def _use_triton(config: ProjectionConfig, device: torch.device) -> bool:
    if config.backend == "cpu":
        return False
    reason = _triton_unavailable_reason(device)
    if config.backend == "triton":
        if reason is not None:
            raise RuntimeError(f"backend='triton' was forced but cannot run: {reason}")
        return True
    return device.type == "cuda" and reason is None


def project(grads: GradientBlocks, config: ProjectionConfig, row_offset: int = 0) -> torch.Tensor:
    """Project gradients: returns ``G @ R[row_offset:, :k] / sqrt(k)``, shape (B, k), float32.

    Args:
        grads: a (B, p) tensor, or a dict/sequence of (B, p_b) blocks taken in order, block b
            starting at global row ``row_offset + sum(p_c for c < b)``. float32, bfloat16 or
            float16. Accumulation is float32, except for Rademacher products on CPUs with
            AMX int8 matrix instructions: those are exact integer sums over each row
            rounded to 31-bit fixed point (error <= 2^-30 of the row's largest entry per
            coordinate).
        config: the projection settings.
        row_offset: global row index of the first gradient coordinate.
    """
    blocks = _as_blocks(grads)
    device = blocks[0].device
    out = torch.zeros(blocks[0].shape[0], config.dim, dtype=torch.float32, device=device)
    if _use_triton(config, device):
        from source_proj.kernels.triton_projection import project_blocks_triton

        project_blocks_triton(blocks, out, config.seed, config.kind, row_offset, precision=config.precision)
    else:
        project_cpu(blocks, out, config.seed, config.kind, row_offset)
    return out.mul_(1.0 / math.sqrt(config.dim))
