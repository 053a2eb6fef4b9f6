"""The random projection matrix: its definition and its CPU computation.

The projection maps a gradient g (p coordinates) to ``g @ R / sqrt(k)`` (k coordinates), where
R is a p x k matrix whose entry R[i, j] is a pure function of (seed, i, j). It is never stored:
the CPU path below and the Triton kernel (``triton_projection``) both regenerate it, block by
block, from the counter-based generator Philox4x32-10 (Salmon et al. 2011; the generator behind
Triton's ``tl.randint4x``). The scale 1/sqrt(k) makes E[P^T P] = I for P = R^T / sqrt(k).

Exact layout (the contract between this module and every kernel):

* Philox4x32-10 with key ``(k0, k1) = (seed mod 2^32, (seed >> 32) mod 2^32)``, ``seed`` a
  non-negative int below 2^64, and 128-bit counter ``(c0, c1, c2, c3)``. Each call returns
  four uint32 words ``(x0, x1, x2, x3)``.
* Rademacher (default): entry (i, j) comes from the call with counter
  ``(i mod 2^32, i >> 32, j // 128, 0)``; it is bit ``j % 32`` (least significant first) of
  word ``x[(j % 128) // 32]``; R[i, j] = +1 if that bit is 0 and -1 if it is 1. One call
  serves 128 consecutive columns of one row; the entries are exact in any float dtype.
* Gaussian: entry (i, j) comes from the call with counter ``(i mod 2^32, i >> 32, j // 4, 1)``.
  With ``u(x) = ((x >> 8) + 1) * 2^-24`` in (0, 1] and ``v(x) = (x >> 8) * 2^-24`` in [0, 1),
  evaluated in float32: for ``j % 4`` in {0, 1}, ``r = sqrt(-2 ln u(x0))``, ``a = 2 pi v(x1)``
  and R[i, j] = ``r cos a`` or ``r sin a``; for ``j % 4`` in {2, 3} the same from ``(x2, x3)``
  (Box-Muller). Kernels agree with this path to float32 round-off of log, cos and sin.

The row index i is global: when gradients arrive as a dict of per-parameter blocks, block b's
rows start at the sum of the widths of the blocks before it (the ``row_offset``).
"""

from __future__ import annotations

import math

import torch

RADEMACHER = "rademacher"
GAUSSIAN = "gaussian"
KINDS = (RADEMACHER, GAUSSIAN)

PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85

# Columns served by one Philox call, per kind.
COLUMNS_PER_CALL = {RADEMACHER: 128, GAUSSIAN: 4}
_KIND_TAG = {RADEMACHER: 0, GAUSSIAN: 1}


def check_seed(seed: int) -> int:
    """Return ``seed`` as an int after checking it is in [0, 2^64)."""
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"projection seed must be in [0, 2**64), got {seed}")
    return seed


def philox4x32(
    seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 on int64 tensors holding uint32 values (any common shape).

    Products of two uint32 values overflow int64 but wrap modulo 2^64, so their low and high
    32-bit halves are still exact after masking.
    """
    seed = check_seed(seed)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in (c0, c1, c2, c3))
    for _ in range(PHILOX_ROUNDS):
        prod_b = c2 * _ROUND_B
        prod_a = c0 * _ROUND_A
        c0 = ((prod_b >> 32) & _MASK32) ^ c1 ^ k0
        c2 = ((prod_a >> 32) & _MASK32) ^ c3 ^ k1
        c1 = prod_b & _MASK32
        c3 = prod_a & _MASK32
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def _unit_floats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    top = (x >> 8).to(torch.float32)
    return (top + 1.0) * 2.0**-24, top * 2.0**-24


def matrix_block(
    seed: int,
    row_start: int,
    row_stop: int,
    col_stop: int,
    kind: str = RADEMACHER,
    *,
    col_start: int = 0,
    scaled: bool = False,
) -> torch.Tensor:
    """Rows [row_start, row_stop) and columns [col_start, col_stop) of R, float32 on the CPU.

    Unscaled by default (entries +-1 or standard normal); ``scaled=True`` divides by
    sqrt(col_stop), the scale of a projection to ``col_stop`` dimensions.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown projection kind {kind!r}; expected one of {KINDS}")
    if not (0 <= row_start <= row_stop and 0 <= col_start <= col_stop):
        raise ValueError(f"bad block rows [{row_start}, {row_stop}) cols [{col_start}, {col_stop})")
    per_call = COLUMNS_PER_CALL[kind]
    g_start, g_stop = col_start // per_call, -(-col_stop // per_call)
    rows = torch.arange(row_start, row_stop, dtype=torch.int64)[:, None]
    groups = torch.arange(g_start, g_stop, dtype=torch.int64)[None, :]
    c0 = (rows & _MASK32).expand(-1, groups.shape[1])
    c1 = (rows >> 32).expand(-1, groups.shape[1])
    c2 = groups.expand(rows.shape[0], -1)
    c3 = torch.full_like(c0, _KIND_TAG[kind])
    words = torch.stack(philox4x32(seed, c0, c1, c2, c3), dim=-1)  # (rows, groups, 4)
    if kind == RADEMACHER:
        shifts = torch.arange(32, dtype=torch.int64)
        bits = (words[..., None] >> shifts) & 1  # (rows, groups, 4, 32)
        block = (1 - 2 * bits).to(torch.float32).reshape(rows.shape[0], -1)
    else:
        u1, _ = _unit_floats(words[..., 0::2])  # (rows, groups, 2): from x0 and x2
        _, v2 = _unit_floats(words[..., 1::2])  # from x1 and x3
        radius = torch.sqrt(-2.0 * torch.log(u1))
        angle = (2.0 * math.pi) * v2
        pair = torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=-1)
        block = pair.reshape(rows.shape[0], -1)
    offset = col_start - g_start * per_call
    block = block[:, offset : offset + (col_stop - col_start)]
    if scaled:
        block = block / math.sqrt(col_stop)
    return block.contiguous()
