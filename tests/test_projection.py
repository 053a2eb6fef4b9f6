"""The random projection on the CPU: the matrix's definition, its statistics and the dispatch.

Oracles: the published Random123 known-answer vectors for Philox4x32-10; a scalar pure-Python
Philox and a per-entry reading of the layout in ``kernels/reference.py`` (independent of the
vectorised torch code); Triton's own ``tl.randint4x``; dense float64 products.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from source_proj.kernels import cpu_projection, reference
from source_proj.kernels.cpu_projection import project_cpu
from source_proj.kernels.reference import GAUSSIAN, RADEMACHER, matrix_block, philox4x32
from source_proj.projection.jl import ProjectionConfig, project

M32 = 0xFFFFFFFF

# Random123's kat_vectors for philox4x32_10: (counter, key) -> output words.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def scalar_philox(key: tuple[int, int], counter: tuple[int, int, int, int]) -> tuple[int, ...]:
    """Philox4x32-10 on Python ints, written from the Random123 paper's round function."""
    k0, k1 = key
    x0, x1, x2, x3 = counter
    for _ in range(10):
        p0, p1 = 0xD2511F53 * x0, 0xCD9E8D57 * x2
        x0, x1, x2, x3 = ((p1 >> 32) ^ x1 ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ x3 ^ k1) & M32, p0 & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return x0, x1, x2, x3


def oracle_entry(seed: int, i: int, j: int, kind: str) -> float:
    """R[i, j] read off the layout in the reference docstring, one scalar at a time."""
    key = (seed & M32, seed >> 32)
    if kind == RADEMACHER:
        words = scalar_philox(key, (i & M32, i >> 32, j // 128, 0))
        return -1.0 if (words[(j % 128) // 32] >> (j % 32)) & 1 else 1.0
    words = scalar_philox(key, (i & M32, i >> 32, j // 4, 1))
    a, b = (words[0], words[1]) if j % 4 < 2 else (words[2], words[3])
    u, v = ((a >> 8) + 1) * 2.0**-24, (b >> 8) * 2.0**-24
    radius, angle = math.sqrt(-2.0 * math.log(u)), 2.0 * math.pi * v
    return radius * (math.cos(angle) if j % 2 == 0 else math.sin(angle))


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    seed = key[0] | (key[1] << 32)
    got = philox4x32(seed, *(torch.tensor([c]) for c in counter))
    assert tuple(int(w) for w in got) == expected
    assert scalar_philox(key, counter) == expected


@pytest.mark.parametrize("kind", [RADEMACHER, GAUSSIAN])
def test_matrix_entries_match_scalar_oracle(kind):
    gen = torch.Generator().manual_seed(1)
    seed = 2**63 + 12345
    rows = [0, 1, 2**32 - 1, 2**32, 2**40 + 7]
    for first in rows:
        block = matrix_block(seed, first, first + 2, 300, kind)
        cols = torch.randint(0, 300, (12,), generator=gen).tolist() + [0, 127, 128, 299]
        for r in range(2):
            for j in cols:
                want = oracle_entry(seed, first + r, j, kind)
                # Rademacher is exact; Gaussian is float32 log/cos/sin against float64.
                assert block[r, j].item() == pytest.approx(want, abs=0 if kind == RADEMACHER else 2e-5)


@pytest.mark.parametrize("kind", [RADEMACHER, GAUSSIAN])
def test_matrix_independent_of_blocking(kind):
    seed, first, last, cols = 99, 2**32 - 50, 2**32 + 70, 333
    full = matrix_block(seed, first, last, cols, kind)
    for cut in (1, 37, 50, 119):
        top = matrix_block(seed, first, first + cut, cols, kind)
        bottom = matrix_block(seed, first + cut, last, cols, kind)
        assert torch.equal(torch.cat([top, bottom]), full)
    for c0, c1 in ((0, 1), (5, 133), (128, 256), (131, 333)):
        assert torch.equal(matrix_block(seed, first, last, c1, kind, col_start=c0), full[:, c0:c1])
    if kind == RADEMACHER:
        assert set(full.unique().tolist()) == {-1.0, 1.0}
        groups = reference.rademacher_rows(seed, first, last, 1, 3)
        assert torch.equal(groups, matrix_block(seed, first, last, 384)[:, 128:384])


@pytest.fixture(params=["int8", "float32"])
def cpu_product(request, monkeypatch):
    """Run a test with each CPU product for Rademacher matrices, whatever this CPU would pick."""
    if request.param == "int8" and not hasattr(torch, "_int_mm"):
        pytest.skip("this torch has no int8 matrix product")
    monkeypatch.setattr(cpu_projection, "_INT8_PRODUCT", request.param == "int8")
    return request.param


@pytest.mark.parametrize("kind", [RADEMACHER, GAUSSIAN])
def test_projection_independent_of_chunking(kind, cpu_product, monkeypatch):
    gen = torch.Generator().manual_seed(2)
    grad = torch.randn(3, 700, generator=gen)
    dense = grad.double() @ matrix_block(7, 10, 710, 200, kind).double()
    outputs = []
    # float32: Philox batches of 1, 8 and all 700 rows (Rademacher: 2 calls a row), expanded
    # in tiles of 1, 2 and 8 rows or as one tile. int8: tiles of 1, 5, 64 and all 700 rows, of
    # one or two column groups, with the exact int32 sums flushed every few rows or never.
    settings = [(1, 4, 1, 1, 3), (17, 20, 5, 1, 10), (2**14, 17 * 512, 64, 2, 2**24), (2**14, 2**20, 2**13, 8, 2**24)]
    for calls, tile_bytes, int8_rows, int8_groups, exact_rows in settings:
        monkeypatch.setattr(cpu_projection, "_CPU_CHUNK_CALLS", calls)
        monkeypatch.setattr(cpu_projection, "_CPU_TILE_BYTES", tile_bytes)
        monkeypatch.setattr(cpu_projection, "_INT8_TILE_ROWS", int8_rows)
        monkeypatch.setattr(cpu_projection, "_INT8_TILE_GROUPS", int8_groups)
        monkeypatch.setattr(cpu_projection, "_EXACT_INT32_ROWS", exact_rows)
        out = torch.zeros(3, 200)
        project_cpu([grad[:, :250], grad[:, 250:251], grad[:, 251:]], out, 7, kind, 10)
        outputs.append(out)
        assert torch.allclose(out.double(), dense, rtol=1e-5, atol=1e-4)
    for other in outputs[1:]:
        if kind == RADEMACHER and cpu_product == "int8":  # exact integer sums: no tiling effect
            assert torch.equal(other, outputs[0])
        else:
            assert torch.allclose(other, outputs[0], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_product_error_bound(dtype):
    """The exact integer product rounds each row g to 31-bit fixed point below a power of two
    2^e > max|g|: each coordinate moves by at most 2^(e - 31) <= 2^-30 max|g|, so each output
    by at most p 2^-30 max|g|, plus the final float32 rounding; rows of any scale (here 1e-35
    to 1e35, and subnormal entries) are treated alike."""
    if not hasattr(torch, "_int_mm"):
        pytest.skip("this torch has no int8 matrix product")
    gen = torch.Generator().manual_seed(8)
    p, k = 5000, 300
    scales = torch.tensor([1.0, 1e-35, 1e35, 3.0, 2.0**-140])[:, None]
    if dtype == torch.float16:
        scales = torch.tensor([1.0, 1e-3, 1e3, 3.0, 2.0**-20])[:, None]  # within float16
    grad = (torch.randn(5, p, generator=gen, dtype=torch.float64) * scales).to(dtype)
    grad[3, 17] = 0.5 * grad[3].abs().max()  # an entry far above the rest of its row
    exact = grad.double() @ matrix_block(11, 2**33, 2**33 + p, k).double()
    got = cpu_projection._rademacher_product_int8([grad], [0], p, 11, k, 2**33)
    row_max = grad.double().abs().amax(dim=1, keepdim=True)
    assert ((got - exact).abs() <= p * 2.0**-30 * row_max).all()
    # Typically the error is a random walk, far inside the bound and float32 GEMM's.
    assert ((got - exact).abs() <= 8 * p**0.5 * 2.0**-31 * row_max).all()
    out = torch.zeros(5, k)
    project_cpu([grad[:, :1000], grad[:, 1000:]], out, 11, RADEMACHER, 2**33)
    assert torch.equal(out, got.float()) or (cpu_projection._INT8_PRODUCT is False)


def test_non_finite_rows_stay_non_finite(cpu_product):
    grad = torch.randn(4, 300, generator=torch.Generator().manual_seed(9))
    clean = project(grad, ProjectionConfig(dim=64, seed=3))
    grad[1, 7], grad[2, 250] = math.nan, -math.inf
    out = project(grad, ProjectionConfig(dim=64, seed=3))
    assert not torch.isfinite(out[1:3]).any()
    assert torch.equal(out[[0, 3]], clean[[0, 3]])


@pytest.mark.parametrize("kind", [RADEMACHER, GAUSSIAN])
def test_gram_matrix_is_identity_in_expectation(kind):
    """P = R^T / sqrt(k): each entry of P^T P averages k independent unit-variance terms."""
    p, k = 48, 8192
    basis = torch.eye(p, dtype=torch.float64)
    proj = project(basis, ProjectionConfig(dim=k, seed=11, kind=kind)).double()  # rows: P e_i
    gram = proj @ proj.T
    off = gram[~torch.eye(p, dtype=torch.bool)]
    sigma = 1.0 / math.sqrt(k)  # std of an off-diagonal entry
    assert off.abs().max() < 5.5 * sigma
    assert abs(off.mean()) < 4 * sigma / math.sqrt(off.numel() / 2)  # symmetric pairs
    assert off.var().item() == pytest.approx(sigma**2, rel=0.15)
    diag = gram.diagonal()
    if kind == RADEMACHER:
        assert torch.allclose(diag, torch.ones(p, dtype=torch.float64), atol=1e-6)
    else:  # chi-square with k degrees of freedom, over k
        assert (diag - 1).abs().max() < 5 * math.sqrt(2 / k)


@pytest.mark.parametrize("kind", [RADEMACHER, GAUSSIAN])
def test_norms_and_distances_within_jl_bounds(kind):
    """For k = 1024 and eps = 0.25, P(| |Px|^2/|x|^2 - 1 | > eps) < 2 exp(-k (eps^2/2 - eps^3/3) / 2)
    = 3e-6 per vector (Achlioptas 2003), so 10 points and their 45 differences stay inside."""
    gen = torch.Generator().manual_seed(3)
    scales = torch.rand(10, 1, generator=gen, dtype=torch.float64)
    points = torch.randn(10, 3000, generator=gen, dtype=torch.float64) * scales
    out = project(points.float(), ProjectionConfig(dim=1024, seed=5, kind=kind)).double()
    ratios = out.norm(dim=1) ** 2 / points.norm(dim=1) ** 2
    assert (ratios - 1).abs().max() < 0.25
    i, j = torch.triu_indices(10, 10, offset=1)
    dist = (out[i] - out[j]).norm(dim=1) ** 2 / (points[i] - points[j]).norm(dim=1) ** 2
    assert (dist - 1).abs().max() < 0.25
    # And the spread is of the expected size: var of the ratio is 2/k (Gaussian), < 2/k (Rademacher).
    assert ratios.std() < 3 * math.sqrt(2 / 1024)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_dict_equals_concatenated_vector(dtype, cpu_product):
    gen = torch.Generator().manual_seed(4)
    grad = torch.randn(4, 530, generator=gen).to(dtype)
    config = ProjectionConfig(dim=96, seed=2**40 + 1)
    blocks = {"w": grad[:, :300], "b": grad[:, 300:301], "empty": grad[:, 301:301], "v": grad[:, 301:]}
    by_blocks = project(blocks, config, row_offset=2**32 - 100)
    whole = project(grad, config, row_offset=2**32 - 100)
    dense = grad.double() @ matrix_block(config.seed, 2**32 - 100, 2**32 + 430, 96).double() / math.sqrt(96)
    assert by_blocks.dtype == torch.float32 and by_blocks.shape == (4, 96)
    assert torch.allclose(by_blocks.double(), dense, rtol=1e-5, atol=1e-5)
    assert torch.allclose(by_blocks, whole, rtol=1e-5, atol=1e-5)
    assert torch.allclose(project(list(blocks.values()), config, row_offset=2**32 - 100), by_blocks)


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="proj_dim"):
        ProjectionConfig(dim=0)
    with pytest.raises(ValueError, match="seed"):
        ProjectionConfig(dim=4, seed=2**64)
    with pytest.raises(ValueError, match="kind"):
        ProjectionConfig(dim=4, kind="sparse")
    with pytest.raises(ValueError, match="backend"):
        ProjectionConfig(dim=4, backend="cuda")
    with pytest.raises(ValueError, match="2-D"):
        project(torch.ones(3), ProjectionConfig(dim=4))


def test_forced_triton_explains_why_it_cannot_run(monkeypatch):
    grad = torch.ones(2, 8)
    config = ProjectionConfig(dim=4, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        project(grad, config)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        project(grad, config)
    # "auto" never fails for want of triton: CPU tensors take the CPU path.
    expected = grad.double() @ matrix_block(0, 0, 8, 4).double() / 2
    assert torch.allclose(project(grad, ProjectionConfig(dim=4)).double(), expected)


triton_missing = importlib.util.find_spec("triton") is None


@pytest.mark.skipif(triton_missing, reason="triton is not installed")
def test_triton_randint4x_is_the_reference_philox():
    """Triton's own generator (interpreted on CPU, compiled on GPU) equals ``philox4x32`` with
    counter (c0, 0, 0, 0): the layout's Philox is the one Triton ships."""
    import triton
    import triton.language as tl

    @triton.jit
    def randint4x_kernel(seed, offsets_ptr, out_ptr, N: tl.constexpr):
        idx = tl.arange(0, N)
        x0, x1, x2, x3 = tl.randint4x(seed, tl.load(offsets_ptr + idx))
        tl.store(out_ptr + idx, x0)
        tl.store(out_ptr + N + idx, x1)
        tl.store(out_ptr + 2 * N + idx, x2)
        tl.store(out_ptr + 3 * N + idx, x3)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    offsets = torch.tensor([0, 1, 2, 12345, 2**31 - 1, -(2**31), -1, 7], dtype=torch.int32)
    for seed in (0, 1, 2**40 + 17, 2**63 - 3):
        out = torch.empty(4, offsets.numel(), dtype=torch.int32, device=device)
        randint4x_kernel[(1,)](seed, offsets.to(device), out, N=offsets.numel())
        c0 = offsets.to(torch.int64) & M32
        zero = torch.zeros_like(c0)
        want = torch.stack(philox4x32(seed, c0, zero, zero, zero))
        assert torch.equal(out.cpu().to(torch.int64) & M32, want)


def test_empty_blocks_and_matrices(cpu_product):
    for kind in (RADEMACHER, GAUSSIAN):
        assert matrix_block(1, 5, 5, 10, kind).shape == (0, 10)
        assert matrix_block(1, 5, 7, 0, kind).shape == (2, 0)
    assert torch.equal(project(torch.ones(3, 0), ProjectionConfig(dim=5)), torch.zeros(3, 5))
    grad = torch.randn(2, 3, generator=torch.Generator().manual_seed(10))
    with_empty = project([torch.ones(2, 0), grad, torch.ones(2, 0)], ProjectionConfig(dim=4, seed=2))
    assert torch.equal(with_empty, project(grad, ProjectionConfig(dim=4, seed=2)))


def _expanded(cached: torch.Tensor, kind: str, dim: int) -> torch.Tensor:
    """The float32 entries of a ``MATRIX_CACHE`` entry (Rademacher: its Philox bytes)."""
    if kind == RADEMACHER:
        return reference.signs_from_bytes(cached.to(torch.int32))[:, :dim]
    return cached


@pytest.mark.parametrize("kind", [RADEMACHER, GAUSSIAN])
def test_cached_matrix_gives_bit_identical_projections(kind, cpu_product, monkeypatch):
    """The cache holds exactly the reference matrix, and a projection through it (first call:
    generated and stored; second: read back) equals the uncached one bit for bit, whatever
    the chunking; both agree with a dense float64 product with the materialised matrix."""
    gen = torch.Generator().manual_seed(12)
    p, k, offset = 1500, 300, 2**32 - 700  # rows cross the 2^32 boundary of the counter
    grad = torch.randn(5, p, generator=gen)
    blocks = [grad[:, :400], grad[:, 400:401], grad[:, 401:]]
    dense = grad.double() @ matrix_block(5, offset, offset + p, k, kind).double()
    for calls, tile_bytes in ((2**16, 2**20), (37, 3000)):
        monkeypatch.setattr(cpu_projection, "_CPU_CHUNK_CALLS", calls)
        monkeypatch.setattr(cpu_projection, "_CPU_TILE_BYTES", tile_bytes)
        outputs = []
        cache = cpu_projection.MatrixCache(2**30)
        for current in (cpu_projection.MatrixCache(0), cache, cache):  # uncached, stored, read back
            monkeypatch.setattr(cpu_projection, "MATRIX_CACHE", current)
            out = torch.zeros(5, k)
            project_cpu(blocks, out, 5, kind, offset)
            outputs.append(out)
        assert len(cache) == 1
        stored = cpu_projection._cached_matrix(5, kind, k, offset, offset + p)
        assert torch.equal(_expanded(stored, kind, k), matrix_block(5, offset, offset + p, k, kind))
        assert torch.equal(outputs[1], outputs[0]) and torch.equal(outputs[2], outputs[0])
        assert torch.allclose(outputs[0].double(), dense, rtol=1e-5, atol=1e-4)


def test_matrix_cache_respects_its_limit(monkeypatch):
    """A matrix larger than the limit is never stored (the projection is still right);
    storing evicts the least recently used matrices until the total fits."""
    grad = torch.randn(2, 1000, generator=torch.Generator().manual_seed(13))
    # A Rademacher matrix of 1000 rows keeps 16 bytes a row per group of 128 columns.
    cache = cpu_projection.MatrixCache(16 * 1000 - 1)
    monkeypatch.setattr(cpu_projection, "MATRIX_CACHE", cache)
    first = project(grad, ProjectionConfig(dim=128, seed=1))
    assert len(cache) == 0 and cache.nbytes == 0
    cache.set_limit(2 * 16 * 1000)
    assert torch.equal(project(grad, ProjectionConfig(dim=128, seed=1)), first)
    project(grad, ProjectionConfig(dim=100, seed=2))  # the same width: one group
    assert len(cache) == 2 and cache.nbytes == 2 * 16 * 1000
    project(grad, ProjectionConfig(dim=128, seed=1))  # seed 1 is now the most recently used
    project(grad, ProjectionConfig(dim=64, seed=3))  # evicts seed 2
    assert cache.nbytes == 2 * 16 * 1000
    made = []

    def make() -> torch.Tensor:
        made.append(1)
        return torch.zeros(16 * 1000, dtype=torch.uint8)

    for seed in (1, 3, 2):  # seeds 1 and 3 are held; seed 2 had been evicted, so it is made again
        cache.fetch((seed, RADEMACHER, 0, 1000, 16, torch.uint8), 16 * 1000, make)
    assert made == [1] and cache.nbytes == 2 * 16 * 1000
    cache.set_limit(16 * 1000)
    assert len(cache) == 1 and cache.nbytes <= cache.limit_bytes
    assert cache.fetch("too big", 16 * 1000 + 1, lambda: pytest.fail("made beyond the limit")) is None
    with pytest.raises(ValueError):
        cache.set_limit(-1)
