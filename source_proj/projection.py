"""Johnson-Lindenstrauss projection of (per-example) gradients, dispatched by device.

``project(grads, config)`` returns ``grads @ R / sqrt(k)`` where R is the seeded random matrix
defined in ``source_proj.kernels.reference`` (see that module for the exact layout). CUDA
tensors go to the Triton kernel, CPU tensors to the CPU path; both compute the same matrix.
Gradients may come as one (B, p) tensor or as a dict/sequence of per-parameter (B, p_b)
blocks whose rows continue the global row index, so nothing is concatenated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from source_proj.kernels.reference import KINDS, RADEMACHER, check_seed, matrix_block

BACKENDS = ("auto", "cpu", "triton")
GradientBlocks = torch.Tensor | Mapping[str, torch.Tensor] | Sequence[torch.Tensor]

# Bound on the CPU path's generated block of R (bytes of float32).
_CPU_BLOCK_BYTES = 32 * 2**20


@dataclass(frozen=True)
class ProjectionConfig:
    """Settings of the random projection.

    Attributes:
        dim: k, the projected dimension (>= 1).
        seed: seed of the random matrix, an int in [0, 2^64).
        kind: "rademacher" (entries +-1/sqrt(k), default) or "gaussian" (N(0, 1/k)).
        backend: "auto" (Triton for CUDA tensors, CPU path otherwise), "cpu" or "triton".
    """

    dim: int
    seed: int = 0
    kind: str = RADEMACHER
    backend: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"proj_dim must be a positive int, got {self.dim!r}")
        check_seed(self.seed)
        if self.kind not in KINDS:
            raise ValueError(f"unknown projection kind {self.kind!r}; expected one of {KINDS}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown projection backend {self.backend!r}; expected one of {BACKENDS}")


def _as_blocks(grads: GradientBlocks) -> list[torch.Tensor]:
    if isinstance(grads, torch.Tensor):
        blocks = [grads]
    elif isinstance(grads, Mapping):
        blocks = list(grads.values())
    else:
        blocks = list(grads)
    if not blocks:
        raise ValueError("no gradient blocks to project")
    batch = blocks[0].shape[0] if blocks[0].dim() > 0 else None
    for b in blocks:
        if b.dim() != 2 or b.shape[0] != batch:
            raise ValueError(
                "gradient blocks must be 2-D (batch, p_b) with one batch size; got shapes "
                f"{[tuple(x.shape) for x in blocks]}"
            )
        if b.device != blocks[0].device:
            raise ValueError("gradient blocks must all be on one device")
    return blocks


def _use_triton(config: ProjectionConfig, device: torch.device) -> bool:
    if config.backend == "cpu":
        return False
    if config.backend == "triton":
        return True
    return device.type == "cuda"


def project_cpu_block(
    grad: torch.Tensor, out: torch.Tensor, seed: int, kind: str, row_offset: int
) -> None:
    """Add ``grad @ R[row_offset : row_offset + p, :k]`` (unscaled) into ``out`` (B, k) float32.

    Generates R in row blocks of bounded size (about 32 MiB), on the CPU, then multiplies on
    ``grad``'s device.
    """
    dim = out.shape[1]
    rows_per_block = max(1, _CPU_BLOCK_BYTES // (4 * dim))
    for start in range(0, grad.shape[1], rows_per_block):
        stop = min(grad.shape[1], start + rows_per_block)
        block = matrix_block(seed, row_offset + start, row_offset + stop, dim, kind)
        out.add_(grad[:, start:stop].to(torch.float32) @ block.to(grad.device))


def project(grads: GradientBlocks, config: ProjectionConfig, row_offset: int = 0) -> torch.Tensor:
    """Project gradients: returns ``G @ R[row_offset:, :k] / sqrt(k)``, shape (B, k), float32.

    Args:
        grads: a (B, p) tensor, or a dict/sequence of (B, p_b) blocks taken in order, block b
            starting at global row ``row_offset + sum(p_c for c < b)``. float32, bfloat16 or
            float16; accumulation is float32.
        config: the projection settings.
        row_offset: global row index of the first gradient coordinate.
    """
    blocks = _as_blocks(grads)
    device = blocks[0].device
    out = torch.zeros(blocks[0].shape[0], config.dim, dtype=torch.float32, device=device)
    if _use_triton(config, device):
        from source_proj.kernels.triton_projection import project_blocks_triton

        project_blocks_triton(blocks, out, config.seed, config.kind, row_offset)
    else:
        offset = row_offset
        for block in blocks:
            project_cpu_block(block, out, config.seed, config.kind, offset)
            offset += block.shape[1]
    return out.mul_(1.0 / math.sqrt(config.dim))
