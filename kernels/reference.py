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
    """Philox4x32-10 on int64 tensors holding uint32 values (broadcastable shapes).

    Returns the four output words as int64 tensors of the broadcast shape, values in
    [0, 2^32). Products of two uint32 values overflow int64 but wrap modulo 2^64, so their low
    and high 32-bit halves are still exact after masking. The low halves are masked lazily:
    they only enter the next round through an xor whose result is masked, so ten full-tensor
    passes per round suffice. Pass unexpanded counters (rows as (n, 1), column groups as
    (1, m)): the first round then runs on the small shapes.
    """
    seed = check_seed(seed)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in (c0, c1, c2, c3))
    for _ in range(PHILOX_ROUNDS):
        prod_b = c2 * _ROUND_B
        prod_a = c0 * _ROUND_A
        c0 = ((prod_b >> 32) ^ c1).bitwise_xor_(k0).bitwise_and_(_MASK32)
        c2 = ((prod_a >> 32) ^ c3).bitwise_xor_(k1).bitwise_and_(_MASK32)
        c1, c3 = prod_b, prod_a  # low halves: masked below or by the next round's xor
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1 & _MASK32, c2, c3 & _MASK32


def _byte_sign_table() -> torch.Tensor:
    """(256, 8) float32: row b holds +1 where bit s of byte b is 0 and -1 where it is 1."""
    bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
    return (1 - 2 * bits).to(torch.float32)


_BYTE_SIGNS = _byte_sign_table()
_BYTE_SHIFTS = torch.arange(0, 32, 8)


def rademacher_rows(
    seed: int,
    row_start: int,
    row_stop: int,
    group_start: int,
    group_stop: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows [row_start, row_stop), columns [128 group_start, 128 group_stop) of Rademacher R.

    Returns float32 (rows, 128 * groups), written into ``out`` when given (a contiguous float32
    CPU tensor of exactly that shape, reused to spare allocations). One Philox call per (row,
    group of 128 columns); the words are split into bytes and each byte is expanded to eight
    +-1.0 entries by a 256-row lookup table (least significant bit first, as the layout says).
    """
    n_rows, n_groups = row_stop - row_start, group_stop - group_start
    rows = torch.arange(row_start, row_stop, dtype=torch.int64)[:, None]
    groups = torch.arange(group_start, group_stop, dtype=torch.int64)[None, :]
    words = torch.stack(philox4x32(seed, rows & _MASK32, rows >> 32, groups, 0), dim=-1)
    byte_index = ((words[..., None] >> _BYTE_SHIFTS) & 0xFF).reshape(-1)  # word-major, LSB first
    if out is None:
        out = torch.empty(n_rows, 128 * n_groups, dtype=torch.float32)
    torch.index_select(_BYTE_SIGNS, 0, byte_index, out=out.view(-1, 8))
    return out


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
    if kind == RADEMACHER:
        block = rademacher_rows(seed, row_start, row_stop, g_start, g_stop)
    else:
        rows = torch.arange(row_start, row_stop, dtype=torch.int64)[:, None]
        groups = torch.arange(g_start, g_stop, dtype=torch.int64)[None, :]
        words = torch.stack(
            philox4x32(seed, rows & _MASK32, rows >> 32, groups, _KIND_TAG[kind]), dim=-1
        )  # (rows, groups, 4)
        u1, _ = _unit_floats(words[..., 0::2])  # (rows, groups, 2): from x0 and x2
        _, v2 = _unit_floats(words[..., 1::2])  # from x1 and x3
        radius = torch.sqrt(-2.0 * torch.log(u1))
        angle = (2.0 * math.pi) * v2
        pair = torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=-1)
        block = pair.reshape(row_stop - row_start, per_call * (g_stop - g_start))
    offset = col_start - g_start * per_call
    block = block[:, offset : offset + (col_stop - col_start)]
    if scaled:
        block = block / math.sqrt(col_stop)
    return block.contiguous()
