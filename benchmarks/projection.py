"""CPU benchmark of the projection: the on-the-fly path against two baselines, in one run.

For each (p, k, batch), times ``project`` (CPU path: R regenerated chunk by chunk from Philox,
never stored) against
  (a) ``torch.matmul`` with the matrix materialised beforehand (generation not timed), and
  (b) TRAK's ``BasicProjector`` (traker 0.3.2, Rademacher, its default 100-column blocks),
and, where the CPU path uses its exact int8 product, (c) the same path with the float32
product it falls back to on CPUs without int8 matrix instructions. It prints a table of
seconds and ratios (baseline time / on-the-fly time: > 1 means the on-the-fly path is faster).
Goals (issue 4): >= 0.5 against (a) at batch >= 64, >= 3 against (b).

(a)'s matrix is capped at ``--max-matrix-gib`` (default 2 GiB, the machine has little memory):
for larger p x k a slab of rows is materialised, timed, and its time scaled by p / rows (the
product streams the matrix row by row, so its time is linear in p); the table says so.
Times are the minimum over ``--repeats`` runs (the machine is shared; the minimum is the least
disturbed), with the median alongside.

Usage: ``python benchmarks/projection.py [--quick] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from source_proj.kernels import cpu_projection
from source_proj.kernels.reference import RADEMACHER, matrix_block
from source_proj.projection.jl import MATRIX_CACHE, ProjectionConfig, project

SEED = 1234


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(min, median) wall seconds of fn() over ``repeats`` runs, after no warm-up run."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def trak_projector(p: int, k: int):
    """TRAK's BasicProjector on the CPU, or None when traker is not importable."""
    try:
        from trak.projectors import BasicProjector, ProjectionType
    except ImportError:
        return None
    return BasicProjector(p, k, SEED, ProjectionType.rademacher, torch.device("cpu"))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="p=1e5, k=1024, batch 16 and 64 only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-matrix-gib", type=float, default=2.0)
    parser.add_argument("--no-trak", action="store_true", help="skip baseline (b)")
    parser.add_argument("--threads", type=int, help="torch threads for every method (default: torch's)")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # The on-the-fly path regenerates R on every call; benchmarks/projection_cache.py times
    # the cached path (R generated once) against it.
    MATRIX_CACHE.set_limit(0)

    sizes_p = (10**5,) if args.quick else (10**5, 10**6)
    sizes_k = (1024,) if args.quick else (1024, 4096)
    batches = (16, 64) if args.quick else (16, 64, 256)
    repeats = 2 if args.quick else args.repeats
    header = (f"CPU projection benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
              f"{cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
              f"times are min (median) of {repeats} runs, float32")
    int8 = cpu_projection._INT8_PRODUCT
    header += (f"; CPU product: {'exact int8 (oneDNN AMX)' if int8 else 'float32'}"
               + ("; (c) is the float32 product this path falls back to without AMX" if int8 else ""))
    print(header, flush=True)
    rows = ["| p | k | B | on the fly (s) | (a) materialised matmul (s) | on-the-fly speed / (a) "
            "| (b) TRAK BasicProjector (s) | on-the-fly speed / (b) | (c) float32 on the fly (s) | speed / (c) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(rows), flush=True)
    gen = torch.Generator().manual_seed(0)
    for p in sizes_p:
        for k in sizes_k:
            slab = min(p, int(args.max_matrix_gib * 2**30 // (4 * k)))
            dense = matrix_block(SEED, 0, slab, k, RADEMACHER)
            trak = None if args.no_trak else trak_projector(p, k)
            for batch in batches:
                grad = torch.randn(batch, p, generator=gen)
                config = ProjectionConfig(dim=k, seed=SEED, backend="cpu")
                ours, ours_med = timed(lambda g=grad, c=config: project(g, c), repeats)
                a_min, a_med = timed(lambda g=grad[:, :slab], m=dense: torch.matmul(g, m), repeats)
                scale = p / slab
                a_min, a_med = a_min * scale, a_med * scale
                a_note = "" if slab == p else f" (slab of {slab} rows, x{scale:.1f})"
                if trak is None:
                    b_cell, b_ratio = "not run" if args.no_trak else "traker not installed", "-"
                else:
                    b_min, b_med = timed(lambda g=grad, t=trak: t.project(g, model_id=0), repeats)
                    b_cell, b_ratio = f"{b_min:.3f} ({b_med:.3f})", f"{b_min / ours:.2f}"
                c_cell, c_ratio = "-", "-"
                if int8:
                    cpu_projection._INT8_PRODUCT = False
                    c_min, c_med = timed(lambda g=grad, c=config: project(g, c), repeats)
                    cpu_projection._INT8_PRODUCT = True
                    c_cell, c_ratio = f"{c_min:.3f} ({c_med:.3f})", f"{c_min / ours:.2f}"
                row = (f"| {p:.0e} | {k} | {batch} | {ours:.3f} ({ours_med:.3f}) | {a_min:.3f} ({a_med:.3f}){a_note} "
                       f"| {a_min / ours:.2f} | {b_cell} | {b_ratio} | {c_cell} | {c_ratio} |")
                rows.append(row)
                print(row, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(header + "\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
