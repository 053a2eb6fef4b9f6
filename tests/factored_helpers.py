"""The factored projection as an explicit matrix, rebuilt from the layout in the docstring of
``source_proj.projection.kronecker`` (offsets written out here, products by ``torch.kron``)."""

from __future__ import annotations

import torch

from source_proj.kernels.reference import matrix_block
from source_proj.projection.kronecker import FactoredProjection


def side_matrix(seed: int, kind: str, index: int, side: int, size: int, dim: int, term: int = 0) -> torch.Tensor:
    """F (size, dim) float64: rows 2^62 + ((2 index + side) 2^8 + term) 2^32 onwards of R over
    sqrt(dim), or the identity when dim == size."""
    if dim == size:
        return torch.eye(size, dtype=torch.float64)
    start = 2**62 + ((2 * index + side) * 2**8 + term) * 2**32
    return matrix_block(seed, start, start + size, dim, kind).double() / dim**0.5


def explicit_matrix(projection: FactoredProjection, numels: dict[str, int]) -> torch.Tensor:
    """P (dim, p) float64 over the attributed parameters in ``numels`` order (name -> size):
    Kronecker blocks r^(-1/2) sum_s A_s^T (x) B_s^T on each factored weight's row-major gradient, then the
    dense block (rows [0, p_rest) of R, the other parameters end to end) or the identity."""
    seed, kind, plan = projection.config.seed, projection.config.kind, projection.plan
    starts, col = {}, 0
    for name, numel in numels.items():
        starts[name] = col
        col += numel
    full = torch.zeros(plan.dim, col, dtype=torch.float64)
    row = 0
    for m, b in enumerate(plan.blocks):
        block = sum(
            torch.kron(side_matrix(seed, kind, m, 0, b.rows, b.k_rows, s).T, side_matrix(seed, kind, m, 1, b.cols, b.k_cols, s).T)
            for s in range(b.terms)
        ) / b.terms**0.5
        full[row : row + b.dim, starts[b.name] : starts[b.name] + b.rows * b.cols] = block
        row += b.dim
    if plan.rest:
        index = torch.cat([torch.arange(starts[n], starts[n] + numels[n]) for n in plan.rest])
        if plan.rest_dim == plan.rest_numel:
            dense = torch.eye(plan.rest_numel, dtype=torch.float64)
        else:
            dense = matrix_block(seed, 0, plan.rest_numel, plan.rest_dim, kind).double().T / plan.rest_dim**0.5
        full[row:, index] = dense
    return full
