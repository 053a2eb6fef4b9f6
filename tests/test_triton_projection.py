"""The Triton projection kernel against the CPU reference (interpreted when there is no GPU).

Oracles: ``matrix_block`` (itself checked against a scalar Philox in test_projection.py) for the
kernel's matrix, read out by projecting identity gradients, which gives R's rows exactly; dense
float64 products for projections of random gradients. Shapes are small: the interpreter runs
each program in numpy.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernel cannot be tested")

from source_proj.kernels.reference import GAUSSIAN, RADEMACHER, matrix_block  # noqa: E402
from source_proj.kernels.triton_projection import Tiles, project_blocks_triton  # noqa: E402
from source_proj.projection.jl import ProjectionConfig, project  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = Tiles(block_b=16, block_n=16, block_p=16, num_warps=4, num_stages=2)
WIDE = Tiles(block_b=16, block_n=128, block_p=32, num_warps=4, num_stages=2)
WIDEST = Tiles(block_b=16, block_n=256, block_p=16, num_warps=4, num_stages=2)  # two Philox calls a row


def kernel_matrix(p, k, seed, kind, row_offset, dtype, tiles, splits, cut=None):
    """Rows [row_offset, row_offset + p) of R as the kernel sees them: I_p @ R."""
    eye = torch.eye(p, dtype=dtype, device=DEVICE)
    blocks = [eye] if cut is None else [eye[:, :cut], eye[:, cut:]]
    out = torch.full((p, k), float("nan"), device=DEVICE).zero_()
    project_blocks_triton(blocks, out, seed, kind, row_offset, tiles=tiles, splits=splits)
    return out.cpu()


@pytest.mark.parametrize(
    "p,k,row_offset,dtype,tiles,splits,cut",
    [
        (37, 300, 0, torch.float32, WIDE, 1, None),
        (37, 45, 2**32 - 11, torch.bfloat16, SMALL, 3, 20),  # rows cross 2^32; two blocks
        (21, 300, 2**40 + 3, torch.float16, WIDEST, 2, None),
        (50, 16, 2**63 - 60, torch.float32, SMALL, 1, 1),  # near the int64 limit; a 1-wide block
    ],
)
def test_rademacher_matrix_is_bit_identical(p, k, row_offset, dtype, tiles, splits, cut):
    seed = 2**64 - 5
    got = kernel_matrix(p, k, seed, RADEMACHER, row_offset, dtype, tiles, splits, cut)
    assert torch.equal(got, matrix_block(seed, row_offset, row_offset + p, k))


def test_gaussian_matrix_matches_to_float_roundoff():
    got = kernel_matrix(24, 40, 3, GAUSSIAN, 2**32 - 5, torch.float32, SMALL, 2)
    want = matrix_block(3, 2**32 - 5, 2**32 + 19, 40, GAUSSIAN)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert got.std() > 0.5  # not a degenerate (e.g. all-zero) matrix


@pytest.mark.parametrize(
    "batch,dtype,kind,precision,tol",
    [
        (1, torch.float32, RADEMACHER, "highest", 1e-6),  # exact three-way bfloat16 split
        (5, torch.bfloat16, RADEMACHER, "highest", 1e-6),
        (3, torch.float16, RADEMACHER, "highest", 1e-6),
        (2, torch.float32, GAUSSIAN, "highest", 1e-5),
        (2, torch.float32, RADEMACHER, "tf32", 2e-3),  # tf32 keeps 11 significant bits
    ],
)
def test_projection_matches_dense_product(batch, dtype, kind, precision, tol):
    gen = torch.Generator().manual_seed(batch)
    p, k, offset, seed = 90, 70, 2**33 + 1, 42
    grad = (torch.randn(batch, p, generator=gen) * torch.logspace(-3, 3, p)).to(dtype)
    start = torch.randn(batch, k, generator=gen)  # the kernel adds into out
    out = start.clone().to(DEVICE)
    blocks = [grad[:, :41].to(DEVICE), grad[:, 41:41].to(DEVICE), grad[:, 41:].to(DEVICE)]
    project_blocks_triton(blocks, out, seed, kind, offset, precision=precision, tiles=SMALL, splits=2)
    dense = grad.double() @ matrix_block(seed, offset, offset + p, k, kind).double()
    error = (out.cpu().double() - start.double() - dense).norm() / dense.norm()
    assert error < tol


def test_dispatch_matches_cpu_path():
    gen = torch.Generator().manual_seed(0)
    grads = {"a": torch.randn(3, 33, generator=gen), "b": torch.randn(3, 20, generator=gen)}
    on_device = {name: g.to(DEVICE) for name, g in grads.items()}
    via_triton = project(on_device, ProjectionConfig(dim=24, seed=9, backend="triton"), row_offset=7)
    via_cpu = project(grads, ProjectionConfig(dim=24, seed=9, backend="cpu"), row_offset=7)
    assert torch.allclose(via_triton.cpu(), via_cpu, rtol=1e-5, atol=1e-5)


def test_rejects_bad_arguments():
    out = torch.zeros(2, 8, device=DEVICE)
    grad = torch.ones(2, 4, device=DEVICE)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        project_blocks_triton([grad.double()], out, 0, RADEMACHER, 0)
    with pytest.raises(ValueError, match="does not match"):
        project_blocks_triton([torch.ones(3, 4, device=DEVICE)], out, 0, RADEMACHER, 0)
    with pytest.raises(ValueError, match="float32"):
        project_blocks_triton([grad], out.double(), 0, RADEMACHER, 0)
    with pytest.raises(ValueError, match="precision"):
        project_blocks_triton([grad], out, 0, RADEMACHER, 0, precision="fp8")
    with pytest.raises(ValueError, match="kind"):
        project_blocks_triton([grad], out, 0, "sparse", 0)
    with pytest.raises(ValueError, match="seed"):
        project_blocks_triton([grad], out, 2**64, RADEMACHER, 0)
    with pytest.raises(ValueError, match="block_n"):
        Tiles(block_b=16, block_n=512, block_p=16)


def test_scale_of_projected_norms():
    """End to end through ``project``: |P x| ~ |x| (the 1/sqrt(k) scale is the caller's)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 64, generator=gen)
    y = project(x.to(DEVICE), ProjectionConfig(dim=128, seed=1, backend="triton")).cpu()
    dense = x.double() @ matrix_block(1, 0, 64, 128).double() / math.sqrt(128)
    assert torch.allclose(y.double(), dense, rtol=1e-5, atol=1e-6)


def test_precision_setting_reaches_the_kernel(monkeypatch):
    """``ProjectionConfig.precision`` is the kernel's ``precision``; the CPU path ignores it."""
    from source_proj.kernels import triton_projection

    seen = []

    def spy(*args, precision="highest", **kwargs):
        seen.append(precision)
        return project_blocks_triton(*args, precision=precision, **kwargs)

    monkeypatch.setattr(triton_projection, "project_blocks_triton", spy)
    x = torch.randn(2, 40, generator=torch.Generator().manual_seed(6))
    dense = x.double() @ matrix_block(4, 0, 40, 32).double() / math.sqrt(32)
    for precision in ("tf32", "highest"):
        y = project(x.to(DEVICE), ProjectionConfig(dim=32, seed=4, backend="triton", precision=precision))
        assert torch.allclose(y.cpu().double(), dense, rtol=2e-3, atol=2e-3)  # tf32: ~4e-4 relative
    assert seen == ["tf32", "highest"]
    y = project(x, ProjectionConfig(dim=32, seed=4, backend="cpu", precision="tf32"))
    assert torch.allclose(y.double(), dense, rtol=1e-5, atol=1e-6)
    assert seen == ["tf32", "highest"]
    with pytest.raises(ValueError, match="precision"):
        ProjectionConfig(dim=4, precision="fp8")


def test_small_blocks_share_launches(monkeypatch):
    """Consecutive small blocks of one dtype are concatenated (bounded by _GROUP_BYTES) into
    one launch; the projection equals the dense product whatever the grouping."""
    from source_proj.kernels import triton_projection

    gen = torch.Generator().manual_seed(7)
    widths = [3, 5, 0, 7, 40, 2, 1]
    dtypes = [torch.float32, torch.float32, torch.float32, torch.bfloat16, torch.float32, torch.float32, torch.float32]
    blocks = [torch.randn(4, w, generator=gen).to(d).to(DEVICE) for w, d in zip(widths, dtypes)]
    monkeypatch.setattr(triton_projection, "_GROUP_BYTES", 4 * 4 * 10)  # 10 float32 columns of 4 rows
    groups = triton_projection._launch_groups(blocks)
    assert [g.shape[1] for g in groups] == [8, 7, 40, 3]  # 3+5 | bf16 7 | 40 alone (never copied) | 2+1
    assert groups[2].data_ptr() == blocks[4].data_ptr()
    dense = sum(
        b.cpu().double() @ matrix_block(9, 2**32 - 30 + s, 2**32 - 30 + s + b.shape[1], 48).double()
        for b, s in zip(blocks, [0, *torch.tensor(widths).cumsum(0).tolist()[:-1]])
    )
    for cap in (0, 4 * 4 * 10, 2**30):  # one launch per block, some groups, one group per dtype run
        monkeypatch.setattr(triton_projection, "_GROUP_BYTES", cap)
        out = torch.zeros(4, 48, device=DEVICE)
        project_blocks_triton(blocks, out, 9, RADEMACHER, 2**32 - 30, tiles=SMALL)
        assert torch.allclose(out.cpu().double(), dense, rtol=1e-5, atol=1e-4)
