"""GPU check of the Triton projection kernel: correctness on the device, then speed vs cuBLAS.

Run on a CUDA machine from the repository root: ``python benchmarks/gpu_check.py [--out DIR]``.
Needs the package installed (``pip install -e .``): the kernels are imported as
``source_proj.kernels``, the only name they have. Steps:

1. versions and device;
2. correctness: the kernel's matrix (identity gradients) bit for bit against the CPU reference
   for several shapes, row offsets (past 2^32), dtypes and tile shapes; projections of random
   gradients against a float64 dense product with the materialised matrix;
3. a tile sweep at p = 2^20, k = 8192 (batch 32 and 256 in bfloat16, 256 in float32), each
   tile shape first checked bit for bit;
4. the issue's table: Triton (best swept tiles) against cuBLAS ``torch.matmul`` with a
   pre-materialised matrix of the same dtype, p in {1e7, 1e8}, k in {2048, 8192}, batch in
   {32, 256}. Both run time linear in p; where a full-size run would take too long (Triton) or
   the matrix would not fit in memory (cuBLAS: p x k bf16 is 1.6 TB at p=1e8, k=8192), a
   slab of rows is timed and the rate (TFLOP/s, a property of the kernel, not of p) is
   reported with the slab's size. Times are CUDA-event medians (triton.testing.do_bench).

Results go to ``--out`` (JSON and a markdown table); the short table is printed last.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import triton
import triton.testing

from source_proj.kernels.reference import GAUSSIAN, RADEMACHER, matrix_block
from source_proj.kernels.triton_projection import Tiles, choose_tiles, project_blocks_triton

SEED = 2**63 + 2**40 + 12345
DEVICE = "cuda"
RESULTS: dict = {"correctness": [], "sweep": [], "table": [], "extras": []}


def log(*args) -> None:
    print(*args, flush=True)


def bench_ms(fn, budget_ms: float = 400.0) -> float:
    """Median milliseconds of fn() by CUDA events (do_bench), with a bounded time budget."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = (time.perf_counter() - start) * 1e3
    rep = max(once * 3, min(budget_ms, once * 20))
    return triton.testing.do_bench(fn, warmup=max(once, 5.0), rep=rep, return_mode="median")


def kernel_matrix(p: int, k: int, offset: int, dtype: torch.dtype, kind: str, tiles, splits=None):
    eye = torch.eye(p, dtype=dtype, device=DEVICE)
    out = torch.zeros(p, k, device=DEVICE)
    project_blocks_triton([eye], out, SEED, kind, offset, tiles=tiles, splits=splits)
    return out.cpu()


def check_matrix(p, k, offset, dtype, kind=RADEMACHER, tiles=None, splits=None) -> bool:
    got = kernel_matrix(p, k, offset, dtype, kind, tiles, splits)
    want = matrix_block(SEED, offset, offset + p, k, kind)
    if kind == RADEMACHER:
        ok, err = torch.equal(got, want), (got - want).abs().max().item()
    else:
        err = (got - want).abs().max().item()
        ok = err < 1e-4
    RESULTS["correctness"].append(
        dict(test="matrix", p=p, k=k, offset=offset, dtype=str(dtype), kind=kind,
             tiles=str(tiles), splits=splits, max_abs_err=err, ok=ok)
    )
    log(f"  matrix {kind:10s} p={p:5d} k={k:5d} off={offset:<22d} {str(dtype):15s} {tiles} -> "
        f"{'bit-identical' if ok and kind == RADEMACHER else ('ok' if ok else 'MISMATCH')} (max err {err:.2e})")
    return ok


def check_projection(batch, p, k, dtype, kind=RADEMACHER, precision="highest") -> bool:
    gen = torch.Generator().manual_seed(batch + p)
    grad = (torch.randn(batch, p, generator=gen) * torch.exp(torch.randn(1, p, generator=gen))).to(dtype)
    offset = 2**32 - p // 2
    out = torch.zeros(batch, k, device=DEVICE)
    project_blocks_triton([grad.to(DEVICE)], out, SEED, kind, offset, precision=precision)
    dense_r = matrix_block(SEED, offset, offset + p, k, kind).to(DEVICE).double()
    dense = grad.to(DEVICE).double() @ dense_r
    err = ((out.double() - dense).norm() / dense.norm()).item()
    limit = {"highest": 1e-5, "tf32": 5e-3}[precision]
    ok = err < limit
    RESULTS["correctness"].append(
        dict(test="projection", batch=batch, p=p, k=k, dtype=str(dtype), kind=kind,
             precision=precision, rel_err=err, ok=ok)
    )
    log(f"  project {kind:10s} B={batch:3d} p={p} k={k} {str(dtype):15s} {precision:8s} "
        f"rel err {err:.2e} (limit {limit:.0e}) {'ok' if ok else 'FAIL'}")
    return ok


def triton_ms(batch, p, k, dtype, tiles=None, kind=RADEMACHER, precision="highest"):
    grad = torch.randn(batch, p, device=DEVICE).to(dtype)
    out = torch.zeros(batch, k, device=DEVICE)
    fn = lambda: project_blocks_triton([grad], out, SEED, kind, 0, precision=precision, tiles=tiles)  # noqa: E731
    fn()  # compile outside the memory count
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base  # the split workspace: no matrix is stored
    ms = bench_ms(fn)
    return ms, extra


def cublas_ms(batch, p, k, dtype):
    """torch.matmul of (batch, p) random gradients with a materialised +-1 (p, k) matrix."""
    grad = torch.randn(batch, p, device=DEVICE).to(dtype)
    mat = (torch.randint(0, 2, (p, k), device=DEVICE, dtype=torch.int8) * 2 - 1).to(dtype)
    ms = bench_ms(lambda: torch.matmul(grad, mat))
    return ms


def tflops(batch, p, k, ms):
    return 2.0 * batch * p * k / (ms * 1e-3) / 1e12


def grouping_ms() -> dict:
    """Milliseconds to project 96 transformer-like parameter blocks (B = 32, k = 2048, bf16),
    with small blocks grouped into shared launches (default) and with one launch per block."""
    from source_proj.kernels import triton_projection

    widths = [768 * 768, 768, 768, 768 * 3072, 3072, 3072 * 768, 768, 768] * 12
    blocks = [torch.randn(32, w, device=DEVICE, dtype=torch.bfloat16) for w in widths]
    out = torch.zeros(32, 2048, device=DEVICE)
    default = triton_projection._GROUP_BYTES
    timings = {"blocks": len(blocks), "p": sum(widths)}
    try:
        for name, cap in (("grouped_ms", default), ("per_block_ms", 0)):
            triton_projection._GROUP_BYTES = cap
            timings[name] = bench_ms(lambda: project_blocks_triton(blocks, out, SEED, RADEMACHER, 0))
    finally:
        triton_projection._GROUP_BYTES = default
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for JSON and markdown")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    info = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__,
                triton=triton.__version__, device=props.name, sms=props.multi_processor_count,
                memory_gb=round(props.total_memory / 2**30, 1))
    RESULTS["info"] = info
    log("== versions", json.dumps(info))

    log("== correctness")
    cases = [
        (320, 8192, 2**32 - 160, torch.bfloat16, None, None),
        (777, 300, 0, torch.float32, None, None),
        (513, 130, 2**40 + 3, torch.float16, None, 3),
        (200, 1000, 2**63 - 1000, torch.float32, Tiles(16, 16, 16, 4, 2), 2),
        (1, 129, 5, torch.bfloat16, None, None),
    ]
    ok = all(check_matrix(*case[:4], tiles=case[4], splits=case[5]) for case in cases)
    ok &= check_matrix(64, 256, 2**32 - 7, torch.float32, GAUSSIAN)
    p_check = 2**12 if args.quick else 65_549
    for dtype, precision in ((torch.bfloat16, "highest"), (torch.float16, "highest"),
                             (torch.float32, "highest"), (torch.float32, "tf32")):
        ok &= check_projection(64, p_check, 2048, dtype, precision=precision)
    ok &= check_projection(3, 4099, 300, torch.float32, GAUSSIAN)
    log(f"== correctness {'PASSED' if ok else 'FAILED'}")

    log("== ceilings")
    n = 2048 if args.quick else 8192
    peak = tflops(n, n, n, cublas_ms(n, n, n, torch.bfloat16))
    RESULTS["bf16_gemm_tflops"] = peak
    log(f"  cuBLAS bf16 {n}^3 on random data: {peak:.0f} TFLOP/s")

    log("== tile sweep (k=8192)")
    slab = 2**14 if args.quick else 2**20
    # Run 1 (2026-11-28) swept block_n=128 shapes; the best of those are kept as baselines.
    sweeps = {
        (32, torch.bfloat16): [Tiles(32, 128, 128, 4, 3), Tiles(32, 256, 64, 4, 3), Tiles(32, 256, 128, 8, 3),
                               Tiles(64, 256, 64, 8, 3), Tiles(32, 128, 128, 4, 4)],
        (256, torch.bfloat16): [Tiles(128, 128, 64, 4, 3), Tiles(128, 256, 64, 8, 3), Tiles(128, 256, 32, 8, 4),
                                Tiles(128, 256, 64, 8, 2), Tiles(128, 128, 64, 4, 4), Tiles(64, 256, 64, 4, 3)],
        (256, torch.float32): [Tiles(128, 128, 32, 4, 3), Tiles(128, 128, 64, 4, 3), Tiles(128, 256, 32, 8, 3)],
    }
    best: dict[tuple[int, torch.dtype], Tiles] = {}
    for (batch, dtype), shapes in sweeps.items():
        best_ms = math.inf
        for tiles in shapes:
            try:
                if not check_matrix(320, 8192, 2**32 - 160, dtype, tiles=tiles):
                    continue
                ms, _ = triton_ms(batch, slab, 8192, dtype, tiles)
            except Exception as error:  # a tile shape the compiler or the chip cannot take
                log(f"  B={batch:3d} {tiles}: failed: {type(error).__name__}: {str(error)[:200]}")
                continue
            rate = tflops(batch, slab, 8192, ms)
            RESULTS["sweep"].append(dict(batch=batch, dtype=str(dtype), tiles=str(tiles), ms=ms, tflops=rate))
            log(f"  B={batch:3d} {str(dtype):14s} {tiles}: {ms:.3f} ms, {rate:.0f} TFLOP/s")
            if ms < best_ms:
                best_ms, best[(batch, dtype)] = ms, tiles
        default = choose_tiles(batch, 8192, dtype, RADEMACHER)
        log(f"  B={batch} {dtype}: best {best.get((batch, dtype))}; choose_tiles gives {default}")

    log("== table (bf16): Triton on the fly vs cuBLAS with the matrix materialised")
    cublas_rate: dict[tuple[int, int], tuple[float, int]] = {}
    for k in (2048, 8192):
        for batch in (32, 256):
            rows = (2**14 if args.quick else 2**31 // k * 4)  # a 16 GiB bf16 matrix slab at most
            ms = cublas_ms(batch, rows, k, torch.bfloat16)
            cublas_rate[(k, batch)] = (tflops(batch, rows, k, ms), rows)
            log(f"  cuBLAS k={k} B={batch}: slab of {rows} rows, {ms:.3f} ms, {cublas_rate[(k, batch)][0]:.0f} TFLOP/s")
    for p in ((10**5, 10**6) if args.quick else (10**7, 10**8)):
        for k in (2048, 8192):
            for batch in (32, 256):
                tiles = best.get((batch, torch.bfloat16))
                est_ms = 2.0 * batch * p * k / 300e12 * 1e3
                rows = p if est_ms < 150 else max(2**20, int(p * 150 / est_ms) // 4096 * 4096)
                ms, extra = triton_ms(batch, rows, k, torch.bfloat16, tiles)
                rate = tflops(batch, rows, k, ms)
                c_rate, c_rows = cublas_rate[(k, batch)]
                row = dict(p=p, k=k, batch=batch, tiles=str(tiles), triton_rows=rows, triton_ms=ms,
                           triton_tflops=rate, triton_full_ms=ms * p / rows, extra_bytes=extra,
                           cublas_rows=c_rows, cublas_tflops=c_rate, ratio=rate / c_rate)
                RESULTS["table"].append(row)
                log(f"  p={p:.0e} k={k} B={batch}: triton {rate:.0f} TFLOP/s ({rows} rows, "
                    f"{ms:.2f} ms; full p {ms * p / rows:.0f} ms), cuBLAS {c_rate:.0f}, "
                    f"ratio {rate / c_rate:.2f}, extra GPU bytes {extra}")
                torch.cuda.empty_cache()

    log("== extras: other dtypes and kinds (k=8192 unless said, slab rows)")
    xrows = 2**14 if args.quick else 2**19
    for batch, dtype, kind, precision, k in (
        (256, torch.float32, RADEMACHER, "highest", 8192),
        (256, torch.float32, RADEMACHER, "tf32", 8192),
        (256, torch.float16, RADEMACHER, "highest", 8192),
        (32, torch.float32, RADEMACHER, "highest", 8192),
        (32, torch.float32, GAUSSIAN, "highest", 2048),
    ):
        try:
            ms, _ = triton_ms(batch, xrows, k, dtype, kind=kind, precision=precision)
        except Exception as error:
            log(f"  B={batch} {dtype} {kind} {precision}: failed: {type(error).__name__}: {str(error)[:200]}")
            continue
        rate = tflops(batch, xrows, k, ms)
        c_ms = cublas_ms(batch, xrows, k, dtype) if kind == RADEMACHER else float("nan")
        c_rate = tflops(batch, xrows, k, c_ms)
        RESULTS["extras"].append(dict(batch=batch, dtype=str(dtype), kind=kind, precision=precision,
                                      k=k, rows=xrows, triton_tflops=rate, cublas_tflops=c_rate))
        log(f"  B={batch} {str(dtype):14s} {kind:10s} {precision:8s} k={k}: triton {rate:.1f} TFLOP/s, "
            f"cuBLAS (same dtype, default settings) {c_rate:.1f}")

    log("== many parameter tensors: grouped launches against one launch per block")
    try:
        RESULTS["grouping"] = grouping_ms()
        log(f"  {RESULTS['grouping']}")
    except Exception as error:  # never lose the results above to this extra measurement
        log(f"  failed: {type(error).__name__}: {str(error)[:200]}")

    (out_dir / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1))
    lines = [f"# GPU projection check, {info['date']}, {info['device']} ({info['sms']} SMs), "
             f"torch {info['torch']}, triton {info['triton']}", "",
             f"correctness: {'PASSED' if ok else 'FAILED'}; cuBLAS bf16 GEMM ceiling {peak:.0f} TFLOP/s", "",
             "| p | k | B | Triton TFLOP/s | cuBLAS TFLOP/s | ratio | Triton time, full p (ms) | rows timed (Triton / cuBLAS) | extra GPU bytes (Triton) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in RESULTS["table"]:
        lines.append(f"| {r['p']:.0e} | {r['k']} | {r['batch']} | {r['triton_tflops']:.0f} | {r['cublas_tflops']:.0f} "
                     f"| {r['ratio']:.2f} | {r['triton_full_ms']:.0f} | {r['triton_rows']} / {r['cublas_rows']} | {r['extra_bytes']} |")
    (out_dir / "gpu_check.md").write_text("\n".join(lines) + "\n")
    log("\n".join(lines))


if __name__ == "__main__":
    main()
