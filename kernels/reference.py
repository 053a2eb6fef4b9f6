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

# kernels/ is the package source_proj.kernels (source_proj/kernels is a link to it) and has no
# __init__.py, so it never hides the PyPI distribution named ``kernels`` (which transformers
# imports): from the repository root Python finds only a namespace portion there, and any
# installed ``kernels`` package takes precedence. Without one installed, the namespace could
# still be imported; this refuses it (before anything else is loaded), and every other kernel
# module imports this one, so they are refused too.
if __package__ != "source_proj.kernels":
    raise ModuleNotFoundError(f"No module named {__name__!r}: kernels/ is the package source_proj.kernels", name=__name__)

import math
import sys

import torch

from source_proj.errors import InputError

if sys.byteorder != "little":  # torch itself supports only little-endian hosts
    raise ImportError("source_proj's random projection needs a little-endian machine")

RADEMACHER = "rademacher"
GAUSSIAN = "gaussian"
KINDS = (RADEMACHER, GAUSSIAN)

PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85

# Product precisions a kernel may be asked for: "highest" (float32 accuracy or better) or
# "tf32" (float32 gradients through one tf32 tensor-core product, ~4e-4 relative; GPU only).
PRECISIONS = ("highest", "tf32")

# Columns served by one Philox call, per kind.
COLUMNS_PER_CALL = {RADEMACHER: 128, GAUSSIAN: 4}
_KIND_TAG = {RADEMACHER: 0, GAUSSIAN: 1}


def check_seed(seed: int) -> int:
    """Return ``seed`` as an int after checking it is in [0, 2^64)."""
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise InputError(f"projection seed must be in [0, 2**64), got {seed}")
    return seed


def philox4x32(
    seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor | int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 on int64 tensors holding uint32 values (broadcastable shapes).

    Returns the four output words as int64 tensors of the broadcast shape, values in
    [0, 2^32). Products of two uint32 values overflow int64 but wrap modulo 2^64, so their low
    and high 32-bit halves are still exact after masking. The low halves are masked lazily:
    they only enter the next round through an xor whose result is masked. Every round runs in
    place on six preallocated arrays: allocating per operation costs more than the arithmetic.
    """
    seed = check_seed(seed)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    counters = [torch.as_tensor(c, dtype=torch.int64) for c in (c0, c1, c2, c3)]
    shape = torch.broadcast_shapes(*(c.shape for c in counters))
    x0, x1, x2, x3 = (c.expand(shape).clone() for c in counters)
    prod_a, prod_b = torch.empty(shape, dtype=torch.int64), torch.empty(shape, dtype=torch.int64)
    for _ in range(PHILOX_ROUNDS):
        torch.mul(x2, _ROUND_B, out=prod_b)
        torch.mul(x0, _ROUND_A, out=prod_a)
        torch.bitwise_right_shift(prod_b, 32, out=x0).bitwise_xor_(x1).bitwise_xor_(k0).bitwise_and_(_MASK32)
        torch.bitwise_right_shift(prod_a, 32, out=x2).bitwise_xor_(x3).bitwise_xor_(k1).bitwise_and_(_MASK32)
        x1, prod_b = prod_b, x1  # low halves: masked below or by the next round's xor
        x3, prod_a = prod_a, x3
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return x0, x1.bitwise_and_(_MASK32), x2, x3.bitwise_and_(_MASK32)


def _byte_sign_tables() -> dict[torch.dtype, torch.Tensor]:
    """Per dtype, row b holds the eight entries of byte b: +1 where bit s is 0, -1 where it is 1.

    Each row's eight entries are stored as raw int64 words (one word for int8, four for
    float32), so expanding bytes is a gather of whole words.
    """
    signs = 1 - 2 * ((torch.arange(256)[:, None] >> torch.arange(8)) & 1)
    return {
        dtype: signs.to(dtype).view(torch.int64).squeeze(1) for dtype in (torch.float32, torch.int8)
    }


_BYTE_SIGNS = _byte_sign_tables()


def rademacher_bytes(
    seed: int, row_start: int, row_stop: int, group_start: int, group_stop: int
) -> torch.Tensor:
    """The random bits of rows [row_start, row_stop), column groups [group_start, group_stop).

    Returns int32 (rows, 16 * groups): byte b of row i holds the signs of columns
    128 group_start + 8 b ... + 8 b + 7 of R (bit s set means R = -1 at column 8 b + s), in
    the layout's order (word x0 first, least significant byte and bit first).
    """
    rows = torch.arange(row_start, row_stop, dtype=torch.int64)[:, None]
    groups = torch.arange(group_start, group_stop, dtype=torch.int64)[None, :]
    words = torch.stack(philox4x32(seed, rows & _MASK32, rows >> 32, groups, 0), dim=-1)
    # Each uint32 word sits in the low four bytes of its int64 (little-endian, as checked at
    # import), so the bytes are read through a view instead of shifted out.
    n_rows, n_words = row_stop - row_start, 4 * (group_stop - group_start)
    low_bytes = words.view(torch.uint8).view(n_rows, n_words, 8)[..., :4]
    return low_bytes.reshape(n_rows, 4 * n_words).to(torch.int32)


def signs_from_bytes(
    byte_index: torch.Tensor, out: torch.Tensor | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Expand (rows, m) bytes from ``rademacher_bytes`` to (rows, 8 m) +-1 entries.

    ``dtype`` is float32 or int8 (exact either way). Written into ``out`` when given (a
    contiguous CPU tensor of that shape, whose dtype then decides, reused to spare allocations).
    """
    if out is None:
        out = torch.empty(byte_index.shape[0], 8 * byte_index.shape[1], dtype=dtype)
    if out.numel() == 0:
        return out
    table = _BYTE_SIGNS[out.dtype]
    words = out.view(torch.int64).view(-1, *table.shape[1:])
    torch.index_select(table, 0, byte_index.reshape(-1), out=words)
    return out


def rademacher_rows(
    seed: int,
    row_start: int,
    row_stop: int,
    group_start: int,
    group_stop: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows [row_start, row_stop), columns [128 group_start, 128 group_stop) of Rademacher R.

    Returns float32 (rows, 128 * groups), written into ``out`` when given (see
    ``signs_from_bytes``). One Philox call per (row, group of 128 columns).
    """
    return signs_from_bytes(rademacher_bytes(seed, row_start, row_stop, group_start, group_stop), out)


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
        raise InputError(f"unknown projection kind {kind!r}; expected one of {KINDS}")
    if not (0 <= row_start <= row_stop and 0 <= col_start <= col_stop):
        raise InputError(f"bad block rows [{row_start}, {row_stop}) cols [{col_start}, {col_stop})")
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
