"""Triton kernel: gradients times the random matrix R, with R generated on the fly.

``project_blocks_triton`` adds ``G_b @ R[rows of block b, :k]`` (unscaled) into a float32
``out`` (B, k) for each gradient block G_b (B, p_b). R is the matrix that ``reference``
defines; no byte of it is ever stored. Each program owns a (BLOCK_B x BLOCK_N) tile of the
output and a range of gradient coordinates (rows of R); for every BLOCK_P rows it loads the
gradient tile, regenerates the (BLOCK_P x BLOCK_N) tile of R in registers from Philox4x32-10
and multiplies with ``tl.dot`` into a float32 accumulator.

Generation. Rademacher tiles take one Philox call per row and 128-column group (BLOCK_N is 256
or divides 128, so a tile spans one or two groups) and expand its 128 bits to +-1 entries,
built directly as bit patterns (no float conversion). The tile is built transposed,
(BLOCK_N, BLOCK_P) with the rows along the fast axis, so that the threads of a warp hold
different rows and do not repeat each other's Philox call. Gaussian tiles take one call
per (row, 4 columns) and apply Box-Muller (log, sqrt, cos, sin): much slower, correct to
float32 round-off.

Precision (the ``precision`` argument). Rademacher entries are exact in bfloat16 and float16,
so bfloat16/float16 gradients go straight to the tensor cores (exact products, float32 sums).
float32 gradients, with ``precision="highest"`` (default), are split exactly into three
bfloat16 parts, g = hi + mid + lo (8 significant bits each cover float32's 24), and the three
exact products are summed in float32: three bfloat16 MMAs, cheaper than tf32x3 (three tf32
MMAs, i.e. six bfloat16-MMA equivalents), whose low part keeps only ~22 bits. Measured on an
H200: relative error 2.5e-6 (the tensor cores' float32 accumulation of three partial products
per step) against 4e-4 for ``precision="tf32"``, which uses one tf32 MMA (~1.35x faster).
Gaussian entries are not exact in any 16-bit type: they are multiplied in float32 with
``tf32x3`` ("highest") or ``tf32``.

Work split. The grid is (output tiles, splits): the p rows of a block are cut into ``splits``
ranges so that the chip is filled when B x k has few tiles. With one split the kernel adds
into ``out`` directly; with more, each split adds into its own slab of a zeroed float32
workspace (splits, B, k), summed into ``out`` afterwards, so results are deterministic.
Offsets into the gradients and the global row index are int64 throughout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from source_proj.errors import InputError

from .reference import GAUSSIAN, KINDS, PRECISIONS, RADEMACHER, check_seed

_ROUND_A: tl.constexpr = tl.constexpr(0xD2511F53)
_ROUND_B: tl.constexpr = tl.constexpr(0xCD9E8D57)
_KEY_A: tl.constexpr = tl.constexpr(0x9E3779B9)
_KEY_B: tl.constexpr = tl.constexpr(0xBB67AE85)
_TWO_PI_F32: tl.constexpr = tl.constexpr(6.2831854820251465)  # float32(2 pi), as the CPU path
_TWO_POW_M24: tl.constexpr = tl.constexpr(5.960464477539063e-08)  # 2^-24

# Programs per streaming multiprocessor that the split aims for (several waves, so that the
# last, partial wave costs little), and the fewest BLOCK_P steps a program should make.
_PROGRAMS_PER_SM = 8
_MIN_STEPS_PER_PROGRAM = 16

# Consecutive gradient blocks (parameter tensors) smaller than this are concatenated and
# projected in one launch: a model's many small tensors (biases, norms) would otherwise cost a
# launch each. The copy is bounded by this size and is cheap next to the product (k flops per
# byte moved).
_GROUP_BYTES = 64 * 2**20


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 values: counter (c0, c1, c2, c3), key (k0, k1)."""
    for _ in tl.static_range(10):
        hi_b = tl.umulhi(c2, _ROUND_B)
        lo_b = c2 * _ROUND_B
        hi_a = tl.umulhi(c0, _ROUND_A)
        lo_a = c0 * _ROUND_A
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = k0 + _KEY_A
        k1 = k1 + _KEY_B
    return c0, c1, c2, c3


@triton.jit
def _rademacher_tile_t(rows, col0, k0, k1, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr):
    """(BLOCK_N, BLOCK_P) tile of R^T in DTYPE: columns col0 + [0, BLOCK_N), rows ``rows``.

    ``rows`` are int64 global row indices (BLOCK_P,); col0 is a multiple of BLOCK_N, which is
    256 or divides 128, so one Philox call per row and group of 128 columns covers the tile.
    +1 where the layout's bit is 0, -1 where it is 1.
    """
    c0 = (rows & 0xFFFFFFFF).to(tl.uint32)
    c1 = (rows >> 32).to(tl.uint32)
    group = (col0 // 128).to(tl.uint32)
    x0, x1, x2, x3 = _philox(c0, c1, group, tl.zeros_like(group), k0, k1)
    cols = (col0 % 128) + tl.arange(0, BLOCK_N)
    word = (cols // 32)[:, None]
    x = tl.where(word == 0, x0[None, :], x1[None, :])
    x = tl.where(word == 2, x2[None, :], x)
    x = tl.where(word == 3, x3[None, :], x)
    if BLOCK_N == 256:  # a second call for the second group of 128 columns
        y0, y1, y2, y3 = _philox(c0, c1, group + 1, tl.zeros_like(group), k0, k1)
        x = tl.where(word == 4, y0[None, :], x)
        x = tl.where(word == 5, y1[None, :], x)
        x = tl.where(word == 6, y2[None, :], x)
        x = tl.where(word == 7, y3[None, :], x)
    bit = (x >> (cols % 32).to(tl.uint32)[:, None]) & 1
    # Entries as bit patterns: the layout's bit becomes the sign bit of +1.0 in DTYPE.
    if DTYPE == tl.float32:
        return ((bit << 31) | 0x3F800000).to(tl.float32, bitcast=True)
    elif DTYPE == tl.bfloat16:
        return ((bit << 15) | 0x3F80).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return ((bit << 15) | 0x3C00).to(tl.uint16).to(tl.float16, bitcast=True)


@triton.jit
def _gaussian_tile_t(rows, col0, k0, k1, BLOCK_N: tl.constexpr):
    """(BLOCK_N, BLOCK_P) float32 tile of Gaussian R^T (Box-Muller, the reference layout)."""
    c0 = (rows & 0xFFFFFFFF).to(tl.uint32)[None, :]
    c1 = (rows >> 32).to(tl.uint32)[None, :]
    cols = col0 + tl.arange(0, BLOCK_N)
    c2 = (cols // 4).to(tl.uint32)[:, None]
    x0, x1, x2, x3 = _philox(c0, c1, c2, tl.full(c2.shape, 1, tl.uint32), k0, k1)
    quarter = (cols % 4)[:, None]
    xu = tl.where(quarter < 2, x0, x2)
    xv = tl.where(quarter < 2, x1, x3)
    u = ((xu >> 8).to(tl.float32) + 1.0) * _TWO_POW_M24
    v = (xv >> 8).to(tl.float32) * _TWO_POW_M24
    radius = tl.sqrt_rn(-2.0 * tl.log(u))
    angle = _TWO_PI_F32 * v
    return tl.where(quarter % 2 == 0, radius * tl.cos(angle), radius * tl.sin(angle))


@triton.jit
def _dot16(a, b, acc, WIDEN: tl.constexpr):
    """acc + a @ b for 16-bit a, b. Triton's interpreter multiplies bfloat16 bit patterns as
    integers (triton-lang/triton#11584), so under it the operands are first widened, exactly,
    to float32; compiled kernels use the 16-bit tensor-core path."""
    if WIDEN:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _accumulate(
    acc,
    g,
    rows,
    col0,
    k0,
    k1,
    GAUSSIAN_KIND: tl.constexpr,
    SPLIT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """acc (BLOCK_B, BLOCK_N) + g (BLOCK_B, BLOCK_P) @ R[rows, col0 : col0 + BLOCK_N]."""
    if GAUSSIAN_KIND:
        r = tl.trans(_gaussian_tile_t(rows, col0, k0, k1, BLOCK_N))
        return tl.dot(g.to(tl.float32), r, acc, input_precision=DOT_PRECISION)
    if SPLIT_FP32:
        r = tl.trans(_rademacher_tile_t(rows, col0, k0, k1, BLOCK_N, tl.bfloat16))
        hi = g.to(tl.bfloat16)
        rest = g - hi.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
        acc = _dot16(lo, r, acc, INTERPRET)
        acc = _dot16(mid, r, acc, INTERPRET)
        return _dot16(hi, r, acc, INTERPRET)
    if g.dtype == tl.float32:
        r = tl.trans(_rademacher_tile_t(rows, col0, k0, k1, BLOCK_N, tl.float32))
        return tl.dot(g, r, acc, input_precision=DOT_PRECISION)
    r = tl.trans(_rademacher_tile_t(rows, col0, k0, k1, BLOCK_N, g.dtype))
    return _dot16(g, r, acc, INTERPRET)


@triton.jit(do_not_specialize=["row_offset", "seed_lo", "seed_hi"])
def _project_kernel(
    g_ptr,
    out_ptr,
    batch,
    p,
    dim,
    stride_gb,
    stride_ob,
    stride_os,
    row_offset,
    rows_per_split,
    seed_lo,
    seed_hi,
    GAUSSIAN_KIND: tl.constexpr,
    SPLIT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """out[split] (B, k) += g (B, p) @ R[row_offset + rows of this split, :k], float32."""
    pid_tile = tl.program_id(0)
    pid_split = tl.program_id(1)
    n_tiles_n = tl.cdiv(dim, BLOCK_N)
    pid_n = pid_tile % n_tiles_n  # fastest: neighbours share gradient tiles in L2
    pid_b = pid_tile // n_tiles_n
    col0 = pid_n * BLOCK_N
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_n = col0 + tl.arange(0, BLOCK_N)
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)

    p_start = pid_split.to(tl.int64) * rows_per_split
    p_stop = tl.minimum(p_start + rows_per_split, p)
    n_full = ((p_stop - p_start) // BLOCK_P).to(tl.int32)
    g_rows = g_ptr + offs_b.to(tl.int64)[:, None] * stride_gb
    b_mask = (offs_b < batch)[:, None]
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for step in range(0, n_full):  # full tiles: the mask is constant along p (vector loads)
        offs_p = p_start + step * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
        g = tl.load(g_rows + offs_p[None, :], mask=b_mask, other=0.0)
        acc = _accumulate(acc, g, row_offset + offs_p, col0, k0, k1, GAUSSIAN_KIND, SPLIT_FP32,
                          DOT_PRECISION, BLOCK_N, INTERPRET)
    offs_p = p_start + n_full * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    if p_start + n_full * BLOCK_P < p_stop:  # the ragged last tile
        g = tl.load(g_rows + offs_p[None, :], mask=b_mask & (offs_p < p_stop)[None, :], other=0.0)
        acc = _accumulate(acc, g, row_offset + offs_p, col0, k0, k1, GAUSSIAN_KIND, SPLIT_FP32,
                          DOT_PRECISION, BLOCK_N, INTERPRET)

    out_ptrs = (
        out_ptr
        + pid_split.to(tl.int64) * stride_os
        + offs_b.to(tl.int64)[:, None] * stride_ob
        + offs_n[None, :]
    )
    mask = b_mask & (offs_n < dim)[None, :]
    tl.store(out_ptrs, tl.load(out_ptrs, mask=mask, other=0.0) + acc, mask=mask)


@dataclass(frozen=True)
class Tiles:
    """Launch shape of the kernel.

    Attributes:
        block_b: gradient rows (batch) per program, a power of two >= 16.
        block_n: output columns per program, a power of two in [16, 256].
        block_p: gradient coordinates (rows of R) per step, a power of two >= 16.
        num_warps: warps per program.
        num_stages: software-pipelining depth of the gradient loads.
    """

    block_b: int
    block_n: int
    block_p: int
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_b", "block_n", "block_p"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise InputError(f"{name} must be a power of two >= 16, got {value}")
        if self.block_n > 256:
            raise InputError(f"block_n must be at most 256 (two Philox calls per row), got {self.block_n}")


def choose_tiles(batch: int, dim: int, dtype: torch.dtype, kind: str) -> Tiles:
    """Tile sizes for Hopper, from the H200 sweeps in benchmarks/results/projection-gpu-h200.md.

    Small batches are generation-bound: wide column tiles (256, two Philox calls a row) share
    each gradient tile widely. Large batches are MMA-bound: 128 x 128 tiles with 4 warps beat
    8 warps and 256-wide tiles. float32 gradients (three MMAs per step) prefer 128 x 256 with 8
    warps. Gaussian tiles stay small (a Philox call per 4 entries, in registers).
    """
    block_b = min(128, max(16, triton.next_power_of_2(batch)))
    if kind == GAUSSIAN:
        return Tiles(min(block_b, 64), min(64, max(16, triton.next_power_of_2(dim))), 32, num_warps=4)
    widest = min(256, max(16, triton.next_power_of_2(dim)))
    if dtype == torch.float32:
        if block_b >= 128:
            return Tiles(128, widest, 32, num_warps=8 if widest == 256 else 4, num_stages=3)
        return Tiles(block_b, min(widest, 128), 32, num_warps=4, num_stages=3)
    if block_b <= 32:
        return Tiles(block_b, widest, 64, num_warps=4, num_stages=3)
    return Tiles(block_b, min(widest, 128), 64, num_warps=4, num_stages=3)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _num_splits(device: torch.device, n_tiles: int, p: int, block_p: int) -> int:
    """Splits of the p rows that give about _PROGRAMS_PER_SM programs per multiprocessor."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = triton.cdiv(_PROGRAMS_PER_SM * sms, n_tiles)
    most = max(1, p // (block_p * _MIN_STEPS_PER_PROGRAM))
    return max(1, min(wanted, most))


def _check(blocks: list[torch.Tensor], out: torch.Tensor, kind: str, precision: str) -> None:
    if kind not in KINDS:
        raise InputError(f"unknown projection kind {kind!r}; expected one of {KINDS}")
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if out.dtype != torch.float32 or out.dim() != 2 or not out.is_contiguous():
        raise InputError(f"out must be a contiguous 2-D float32 tensor, got {out.dtype} {tuple(out.shape)}")
    if out.device.type != "cuda" and not _interpreting():
        raise RuntimeError("the Triton projection needs CUDA tensors (or TRITON_INTERPRET=1)")
    for block in blocks:
        if block.dim() != 2 or block.shape[0] != out.shape[0] or block.device != out.device:
            raise InputError(
                f"gradient block {tuple(block.shape)} on {block.device} does not match out "
                f"{tuple(out.shape)} on {out.device}"
            )
        if block.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise InputError(f"gradients must be float32, bfloat16 or float16, got {block.dtype}")


def _launch_groups(blocks: list[torch.Tensor]) -> list[torch.Tensor]:
    """The non-empty blocks, in order, with runs of consecutive small blocks of one dtype
    concatenated (each run at most ``_GROUP_BYTES``; larger blocks are never copied): one
    launch per group instead of one per parameter tensor."""
    groups: list[torch.Tensor] = []
    run: list[torch.Tensor] = []
    run_bytes = 0
    for block in blocks:
        if block.shape[1] == 0:
            continue
        size = block.shape[0] * block.shape[1] * block.element_size()
        if run and (block.dtype != run[0].dtype or run_bytes + size > _GROUP_BYTES):
            groups.append(run[0] if len(run) == 1 else torch.cat(run, dim=1))
            run, run_bytes = [], 0
        run.append(block)
        run_bytes += size
    if run:
        groups.append(run[0] if len(run) == 1 else torch.cat(run, dim=1))
    return groups


def project_blocks_triton(
    blocks: list[torch.Tensor],
    out: torch.Tensor,
    seed: int,
    kind: str,
    row_offset: int,
    *,
    precision: str = "highest",
    tiles: Tiles | None = None,
    splits: int | None = None,
) -> None:
    """Add ``block_b @ R[rows of block b, :k]`` (unscaled) into ``out`` (B, k) float32.

    Args:
        blocks: (B, p_b) gradient blocks, float32, bfloat16 or float16, on ``out``'s device;
            block b covers global rows ``row_offset + sum(p_c for c < b)`` onwards. Runs of
            small blocks of one dtype are concatenated and share a launch.
        out: (B, k) float32, contiguous; added into (the caller scales by 1/sqrt(k)).
        seed: the matrix's seed, in [0, 2^64).
        kind: "rademacher" or "gaussian".
        row_offset: global row index of the first block's first coordinate (int64 range).
        precision: "highest" (float32 accuracy) or "tf32" (faster for float32 gradients and
            Gaussian matrices, relative error ~1e-3); see the module docstring.
        tiles: launch shape; ``choose_tiles`` when None.
        splits: ranges the rows of each block are cut into; chosen to fill the GPU when None.
    """
    _check(blocks, out, kind, precision)
    seed = check_seed(seed)
    batch, dim = out.shape
    offset = int(row_offset)
    if batch == 0 or dim == 0:
        return
    for block in _launch_groups(blocks):
        p = block.shape[1]
        if block.stride(1) != 1:
            block = block.contiguous()
        shape = tiles or choose_tiles(batch, dim, block.dtype, kind)
        n_tiles = triton.cdiv(batch, shape.block_b) * triton.cdiv(dim, shape.block_n)
        n_splits = splits or _num_splits(out.device, n_tiles, p, shape.block_p)
        rows_per_split = triton.cdiv(triton.cdiv(p, n_splits), shape.block_p) * shape.block_p
        n_splits = triton.cdiv(p, rows_per_split)
        target = out if n_splits == 1 else out.new_zeros(n_splits, batch, dim)
        split_fp32 = kind == RADEMACHER and block.dtype == torch.float32 and precision == "highest"
        _project_kernel[(n_tiles, n_splits)](
            block,
            target,
            batch,
            p,
            dim,
            block.stride(0),
            dim,
            0 if n_splits == 1 else batch * dim,
            offset,
            rows_per_split,
            seed & 0xFFFFFFFF,
            seed >> 32,
            GAUSSIAN_KIND=kind == GAUSSIAN,
            SPLIT_FP32=split_fp32,
            DOT_PRECISION="tf32x3" if precision == "highest" else "tf32",
            BLOCK_B=shape.block_b,
            BLOCK_N=shape.block_n,
            BLOCK_P=shape.block_p,
            INTERPRET=_interpreting(),
            num_warps=shape.num_warps,
            num_stages=shape.num_stages,
        )
        if n_splits > 1:
            out.add_(target.sum(dim=0))
        offset += p
