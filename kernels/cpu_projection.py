"""The CPU product ``G @ R``: R generated from Philox once per projection, multiplied tile by tile.

The matrix is the one ``reference`` defines. Rademacher products run in exact integer
arithmetic on CPUs with AMX (int8 tiles of R, gradients as 31-bit fixed point), elsewhere in
float32; Gaussian products in float32. Gradients arrive as per-parameter blocks laid end to
end, and tiles run across block boundaries, so many small blocks cost no extra generation.

Generating R is the costly part of a projection of few rows (Philox: ten rounds of 64-bit
arithmetic per 128 Rademacher entries), and a fit projects the same rows of the same matrix
for every block of training rows, query block and segment. So the generated matrix of a call
is kept in ``MATRIX_CACHE``, a bounded LRU cache keyed by (seed, kind, rows, width, dtype):
Rademacher matrices as their Philox bytes (uint8, one bit per entry; each tile is still
expanded to +-1 on use, a table lookup, ~1/6 of generating it), Gaussian ones as float32
entries. A matrix larger than the cache's limit (default 1 GiB) is not kept: it is regenerated
tile by tile on every call, in bounded memory. Either way the tiles multiplied are the same
numbers in the same shapes, so cached and uncached products are bit-identical.
"""

from __future__ import annotations

import bisect
import itertools
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence

import torch

from source_proj.errors import InputError

from .reference import (
    COLUMNS_PER_CALL,
    RADEMACHER,
    matrix_block,
    rademacher_bytes,
    signs_from_bytes,
)

# The CPU path generates R's bits by Philox batches of 2^16 calls, whose int64 word arrays
# (512 KiB) are large enough for torch to split each operation over threads, and expands them
# to tiles, each multiplied into the output: float32 tiles of 1 MiB, which stay in cache for
# the product, or int8 tiles of 8192 rows x 8 column groups (one batch, 8 MiB).
_CPU_CHUNK_CALLS = 2**16
_CPU_TILE_BYTES = 2**20
_INT8_TILE_ROWS = 8192
_INT8_TILE_GROUPS = 8

# Rademacher products on the CPU run in exact integer arithmetic where int8 matrix products
# are fast (oneDNN with AMX; measured there at ~2x float32's rate with four digit rows per
# gradient row, while oneDNN's signed x signed int8 kernels without AMX are not known to beat
# float32 by the needed 4x): R's +-1 entries are exact int8, and each gradient row,
# scaled by a power of two, is rounded to a 31-bit fixed-point integer held as four int8
# digits. int32 sums of digit x sign products stay exact for up to 2^24 rows.
_FIXED_POINT_BITS = 31
_EXACT_INT32_ROWS = 2**24


def _int8_product_is_fast() -> bool:
    """Whether ``torch._int_mm`` runs on oneDNN kernels with AMX int8 tile instructions."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # a private probe: absent means no
    return hasattr(torch, "_int_mm") and torch.backends.mkldnn.is_available() and amx is not None and bool(amx())


_INT8_PRODUCT = _int8_product_is_fast()

_DEFAULT_CACHE_BYTES = 2**30


class MatrixCache:
    """A least-recently-used cache of generated random matrices, bounded in bytes.

    An entry larger than the limit is never stored (the caller then generates the matrix tile
    by tile); storing one evicts the least recently used entries until the total fits.
    Thread-safe: a matrix asked for by two threads at once is generated once.
    """

    def __init__(self, limit_bytes: int) -> None:
        self._entries: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self._limit = 0
        self.set_limit(limit_bytes)

    @property
    def limit_bytes(self) -> int:
        """The most bytes the entries may hold together."""
        return self._limit

    @property
    def nbytes(self) -> int:
        """Bytes held by the entries now."""
        with self._lock:
            return sum(_nbytes(entry) for entry in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def set_limit(self, limit_bytes: int) -> None:
        """Change the limit (0 disables caching), evicting entries until they fit."""
        if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int) or limit_bytes < 0:
            raise InputError(f"the matrix cache limit must be an int >= 0 (bytes), got {limit_bytes!r}")
        with self._lock:
            self._limit = limit_bytes
            self._evict(0)

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._entries.clear()

    def fetch(self, key: Hashable, nbytes: int, make: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        """The entry of ``key``; else ``make()`` (a tensor of ``nbytes`` bytes), stored and
        returned when it fits within the limit; else None, without calling ``make``."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            if nbytes > self._limit:
                return None
            self._evict(nbytes)
            entry = self._entries[key] = make()
            return entry

    def _evict(self, room: int) -> None:
        """Drop least recently used entries until ``room`` more bytes fit (lock held)."""
        held = sum(_nbytes(entry) for entry in self._entries.values())
        while self._entries and held + room > self._limit:
            held -= _nbytes(self._entries.popitem(last=False)[1])


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


MATRIX_CACHE = MatrixCache(_DEFAULT_CACHE_BYTES)


def _cached_matrix(seed: int, kind: str, dim: int, row_start: int, row_stop: int) -> torch.Tensor | None:
    """R's rows [row_start, row_stop) for ``dim`` columns, from ``MATRIX_CACHE`` (generated
    once, by Philox batches of about ``_CPU_CHUNK_CALLS`` calls): Rademacher as the uint8
    bytes of ``rademacher_bytes`` for every column group, (rows, 16 groups); Gaussian as
    float32 entries, (rows, dim). None when that exceeds the cache's limit, or is empty."""
    n_groups = -(-dim // COLUMNS_PER_CALL[kind])
    rows = row_stop - row_start
    if rows == 0 or dim == 0:
        return None
    if kind == RADEMACHER:
        width, dtype = 16 * n_groups, torch.uint8

        def part(first: int, last: int) -> torch.Tensor:
            return rademacher_bytes(seed, first, last, 0, n_groups)
    else:
        width, dtype = dim, torch.float32

        def part(first: int, last: int) -> torch.Tensor:
            return matrix_block(seed, first, last, dim, kind)

    def make() -> torch.Tensor:
        whole = torch.empty(rows, width, dtype=dtype)
        step = max(1, _CPU_CHUNK_CALLS // n_groups)
        for first in range(row_start, row_stop, step):
            last = min(row_stop, first + step)
            whole[first - row_start : last - row_start] = part(first, last)
        return whole

    key = (seed, kind, row_start, row_stop, width, dtype)
    return MATRIX_CACHE.fetch(key, rows * width * dtype.itemsize, make)


def _sign_bytes(
    cached: torch.Tensor | None, seed: int, row_start: int, first: int, last: int, g0: int, g1: int
) -> torch.Tensor:
    """``rademacher_bytes(seed, first, last, g0, g1)`` (int32), sliced from ``cached`` (the
    matrix's bytes from row ``row_start``, see ``_cached_matrix``) or generated if None."""
    if cached is None:
        return rademacher_bytes(seed, first, last, g0, g1)
    return cached[first - row_start : last - row_start, 16 * g0 : 16 * g1].to(torch.int32)


def _cpu_chunks(
    seed: int, kind: str, dim: int, row_start: int, row_stop: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (first row, R[first : first + n, :dim]) float32 chunks covering [row_start, row_stop).

    Rademacher chunks are tiles of about ``_CPU_TILE_BYTES``, views of one reused buffer: each
    is valid only until the next is yielded. Gaussian chunks hold about ``_CPU_CHUNK_CALLS``
    Philox calls. The chunks are the same whether R comes from ``MATRIX_CACHE`` or not.
    """
    per_call = COLUMNS_PER_CALL[kind]
    n_groups = -(-dim // per_call)
    rows_per_chunk = max(1, _CPU_CHUNK_CALLS // n_groups)
    cached = _cached_matrix(seed, kind, dim, row_start, row_stop)
    if kind != RADEMACHER:
        for first in range(row_start, row_stop, rows_per_chunk):
            last = min(row_stop, first + rows_per_chunk)
            chunk = None if cached is None else cached[first - row_start : last - row_start]
            yield first, matrix_block(seed, first, last, dim, kind) if chunk is None else chunk
        return
    rows_per_tile = min(rows_per_chunk, max(1, _CPU_TILE_BYTES // (4 * per_call * n_groups)))
    buffer = torch.empty(min(rows_per_tile, row_stop - row_start), n_groups * per_call)
    for first in range(row_start, row_stop, rows_per_chunk):
        last = min(row_stop, first + rows_per_chunk)
        bits = _sign_bytes(cached, seed, row_start, first, last, 0, n_groups)
        for tile in range(first, last, rows_per_tile):
            stop = min(last, tile + rows_per_tile)
            chunk = signs_from_bytes(bits[tile - first : stop - first], out=buffer[: stop - tile])
            yield tile, chunk[:, :dim]


def _powers_of_two(exponents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2^exponents, exactly, in ``dtype`` (the exponents must be within its range)."""
    return torch.ldexp(torch.ones(exponents.shape, dtype=dtype), exponents)


def _flat_view(buffer: torch.Tensor, *shape: int) -> torch.Tensor:
    """The first prod(shape) elements of a flat buffer, as a contiguous tensor of ``shape``."""
    return buffer[: math.prod(shape)].view(shape)


def _fixed_point_digits(
    pieces: Sequence[tuple[torch.Tensor, int]],
    factors: tuple[torch.Tensor, torch.Tensor],
    digits: torch.Tensor,
    scaled: torch.Tensor,
    fixed: torch.Tensor,
) -> torch.Tensor:
    """Write the int8 digits of q = round(x * f0 * f1) into ``digits`` (4, B, n) and return it.

    x (B, n) is given as ``pieces`` (gradient columns, first column within x) covering it;
    ``factors`` are two (B, 1) float32 powers of two (applied one after the other, so each
    stays within float32's range and the scaling is exact) with |q| < 2^30; ``scaled`` and
    ``fixed`` are (B, n) float32 and int32 work buffers (reused: fresh ones per tile cost more
    in page faults than the arithmetic). Then q = d0 + 2^8 d1 + 2^16 d2 + 2^24 d3 exactly:
    adding 128 to the three low bytes and flipping their top bits turns two's-complement bytes
    into balanced digits in [-128, 127]; the top byte is the signed remainder, |d3| <= 64.
    """
    for piece, column in pieces:
        torch.mul(piece, factors[0], out=scaled[:, column : column + piece.shape[1]])
    scaled.mul_(factors[1]).round_()
    fixed.copy_(scaled).add_(0x808080).bitwise_xor_(0x808080)
    digits.copy_(fixed.view(torch.int8).view(*scaled.shape, 4).permute(2, 0, 1))
    return digits


def _pieces(
    blocks: Sequence[torch.Tensor], starts: Sequence[int], first: int, last: int
) -> Iterator[tuple[torch.Tensor, int]]:
    """The columns [first, last) of the blocks laid end to end (block b from ``starts[b]``),
    as (block slice, offset of its first column from ``first``) pairs."""
    b = max(0, bisect.bisect_right(starts, first) - 1)
    while b < len(blocks) and starts[b] < last:
        lo, hi = max(first, starts[b]), min(last, starts[b] + blocks[b].shape[1])
        if lo < hi:
            yield blocks[b][:, lo - starts[b] : hi - starts[b]], lo - first
        b += 1


def _rademacher_product_int8(
    blocks: Sequence[torch.Tensor], starts: Sequence[int], width: int, seed: int, dim: int, row_offset: int
) -> torch.Tensor:
    """``G @ R[row_offset:, :dim]`` (unscaled, Rademacher) in integer arithmetic; (B, dim) float64.

    G is the (B, p) CPU blocks laid end to end (block b from column ``starts[b]``, p =
    ``width``). Each row g, with max|g| < 2^e, is rounded to
    q = round(g 2^(30 - e)) (|q| < 2^30), so each coordinate is off by at most
    2^(e - 31) <= 2^-30 max|g|. The products of q's int8 digits with R's +-1 tiles are exact
    integers, so that rounding and one final rounding are the only errors, and the result
    does not depend on tiling, blocks or threads. Rows holding NaN or inf give NaN rows.
    """
    batch = blocks[0].shape[0]
    row_max = torch.zeros(batch, dtype=torch.float64)
    for block in blocks:
        if block.shape[1]:
            block_max = torch.maximum(block.amax(dim=1), block.amin(dim=1).neg()).double()
            row_max = torch.maximum(row_max, block_max)  # NaN propagates
    finite = torch.isfinite(row_max)
    if not finite.all():
        blocks = [block.masked_fill(~finite[:, None], 0) for block in blocks]
    shift = _FIXED_POINT_BITS - 1 - torch.frexp(torch.where(finite, row_max, 0.0)).exponent
    half = torch.div(shift, 2, rounding_mode="floor")
    factors = (_powers_of_two(half, torch.float32)[:, None], _powers_of_two(shift - half, torch.float32)[:, None])

    n_groups = -(-dim // COLUMNS_PER_CALL[RADEMACHER])
    tile_rows = min(_INT8_TILE_ROWS, width)
    tile_cols = 128 * min(_INT8_TILE_GROUPS, n_groups)
    scaled = torch.empty(batch * tile_rows)
    fixed = torch.empty(batch * tile_rows, dtype=torch.int32)
    digits = torch.empty(4 * batch * tile_rows, dtype=torch.int8)
    signs = torch.empty(tile_rows * tile_cols, dtype=torch.int8)
    product = torch.empty(4 * batch * tile_cols, dtype=torch.int32)
    partial = torch.zeros(4 * batch, 128 * n_groups, dtype=torch.int32)
    totals = torch.zeros(4 * batch, dim, dtype=torch.float64)
    partial_rows = 0
    cached = _cached_matrix(seed, RADEMACHER, dim, row_offset, row_offset + width)
    for first in range(0, width, _INT8_TILE_ROWS):
        last = min(width, first + _INT8_TILE_ROWS)
        rows = last - first
        if partial_rows + rows > _EXACT_INT32_ROWS:
            totals.add_(partial[:, :dim])
            partial.zero_()
            partial_rows = 0
        tile_digits = _fixed_point_digits(
            list(_pieces(blocks, starts, first, last)),
            factors,
            _flat_view(digits, 4, batch, rows),
            _flat_view(scaled, batch, rows),
            _flat_view(fixed, batch, rows),
        ).view(4 * batch, rows)
        for g0 in range(0, n_groups, _INT8_TILE_GROUPS):
            g1 = min(n_groups, g0 + _INT8_TILE_GROUPS)
            bits = _sign_bytes(cached, seed, row_offset, row_offset + first, row_offset + last, g0, g1)
            tile = signs_from_bytes(bits, out=_flat_view(signs, rows, 128 * (g1 - g0)))
            out = _flat_view(product, 4 * batch, 128 * (g1 - g0))
            partial[:, 128 * g0 : 128 * g1].add_(torch._int_mm(tile_digits, tile, out=out))
        partial_rows += rows
    totals.add_(partial[:, :dim])
    weights = torch.tensor([1.0, 2.0**8, 2.0**16, 2.0**24], dtype=torch.float64)
    result = torch.einsum("l,lbk->bk", weights, totals.view(4, batch, dim))
    result.mul_(_powers_of_two(-shift, torch.float64)[:, None])
    return result.masked_fill_(~finite[:, None], math.nan)


def project_cpu(
    blocks: Sequence[torch.Tensor], out: torch.Tensor, seed: int, kind: str, row_offset: int
) -> None:
    """Add ``G @ R[row_offset : row_offset + p, :k]`` (unscaled) into ``out`` (B, k) float32.

    G is the (B, p_b) ``blocks`` laid end to end, in any float dtype. The product runs on the
    CPU (CUDA blocks are copied over first), R generated tile by tile over all blocks at once,
    so memory stays bounded whatever p is and small blocks cost no extra generation batches.
    Rademacher products are exact integer products where int8 kernels are fast (see
    ``_rademacher_product_int8``, error <= 2^-30 max|g| per coordinate), float32 products
    otherwise.
    """
    blocks = [block.cpu() for block in blocks]
    starts = [0, *itertools.accumulate(b.shape[1] for b in blocks)]
    width = starts.pop()
    if kind == RADEMACHER and _INT8_PRODUCT:
        result = _rademacher_product_int8(blocks, starts, width, seed, out.shape[1], row_offset)
    else:
        result = torch.zeros(out.shape, dtype=torch.float32)
        for first, chunk in _cpu_chunks(seed, kind, out.shape[1], row_offset, row_offset + width):
            local = first - row_offset
            for piece, column in _pieces(blocks, starts, local, local + chunk.shape[0]):
                result.addmm_(piece.to(torch.float32), chunk[column : column + piece.shape[1]])
    out.add_(result.to(out.device, torch.float32))
