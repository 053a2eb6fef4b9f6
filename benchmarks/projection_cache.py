"""CPU projection with and without ``MATRIX_CACHE``: the random matrix generated on every call
(before) against generated once and reused (after), in one run.

A fit projects the gradients of every block of training rows, every query block and every
segment with the same matrix; each call used to regenerate R from Philox. For each (kind, p, k,
B) this times ``project`` with the cache disabled (``MATRIX_CACHE.set_limit(0)``: R regenerated
tile by tile, the path before the cache) and with a warm cache (R generated once beforehand,
that first call timed separately), interleaved, min (median) of ``--repeats`` rounds, and
checks that both give bit-identical outputs. Each (kind, p, k, B) runs in a fresh process; its
peak resident memory (VmHWM, ``lm.peak_rss``) at the end of the rounds covers both paths and the
cache entry. The table, with machine, load and date, is printed and written to
``benchmarks/results/projection-cache-<date>.md``.

Usage: ``python benchmarks/projection_cache.py [--quick] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from lm import peak_rss  # a sibling script (this script's folder is on sys.path)

from source_proj.kernels import cpu_projection
from source_proj.kernels.reference import GAUSSIAN, RADEMACHER
from source_proj.projection.jl import MATRIX_CACHE, ProjectionConfig, project

SEED = 1234


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def seconds(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def measure(kind: str, p: int, k: int, batch: int, repeats: int) -> dict:
    """One (kind, p, k, B) in this process: the first call's time, the regenerated and cached
    calls' times over ``repeats`` interleaved rounds, the cache entry (MiB), whether the outputs
    were bit-identical, and this process's peak resident memory (bytes) at the end."""
    limit = MATRIX_CACHE.limit_bytes
    grad = torch.randn(batch, p, generator=torch.Generator().manual_seed(0))
    config = ProjectionConfig(dim=k, seed=SEED, kind=kind, backend="cpu")
    t_first, _ = seconds(lambda: project(grad, config))
    entry_mib = MATRIX_CACHE.nbytes / 2**20
    before, after = [], []
    identical = True
    for _ in range(repeats):
        MATRIX_CACHE.set_limit(0)  # evicts: every call regenerates R
        t, uncached = seconds(lambda: project(grad, config))
        before.append(t)
        MATRIX_CACHE.set_limit(limit)
        project(grad, config)  # refill (untimed)
        t, cached = seconds(lambda: project(grad, config))
        after.append(t)
        identical &= torch.equal(uncached, cached)
    return {"first": t_first, "before": before, "after": after, "entry_mib": entry_mib, "identical": identical,
            "peak": peak_rss()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="p = 1e5 only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 is the least "
                        "disturbed by other processes on a shared machine")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--case", nargs=4, help=argparse.SUPPRESS)  # a child process: kind p k B
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case:
        kind, *sizes = args.case
        print(json.dumps(measure(kind, *map(int, sizes), args.repeats)))
        return
    cases = [(RADEMACHER, 10**5, 1024, 16), (RADEMACHER, 10**5, 1024, 64), (GAUSSIAN, 10**5, 1024, 16)]
    if not args.quick:
        cases += [(RADEMACHER, 10**6, 1024, 16), (RADEMACHER, 10**6, 1024, 64)]
    load_before = os.getloadavg()[0]
    limit = MATRIX_CACHE.limit_bytes
    rows = ["| kind | p | k | B | regenerated per call (s) | cached (s) | speed-up | first call, filling the cache (s) "
            "| cache entry (MiB) | bit-identical | peak RSS (MiB) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(rows), flush=True)
    threads = ["--threads", str(args.threads)] if args.threads else []
    for kind, p, k, batch in cases:
        done = subprocess.run([sys.executable, __file__, "--case", kind, str(p), str(k), str(batch),
                               "--repeats", str(args.repeats), *threads], check=True, capture_output=True, text=True)
        m = json.loads(done.stdout.strip().splitlines()[-1])
        before, after = m["before"], m["after"]
        row = (f"| {kind} | {p:.0e} | {k} | {batch} | {min(before):.3f} ({statistics.median(before):.3f}) "
               f"| {min(after):.3f} ({statistics.median(after):.3f}) | {min(before) / min(after):.2f}x "
               f"| {m['first']:.3f} | {m['entry_mib']:.1f} | {'yes' if m['identical'] else 'NO'} "
               f"| {m['peak'] / 2**20:.0f} |")
        rows.append(row)
        print(row, flush=True)
    today = datetime.date.today().isoformat()
    product = "exact int8 (oneDNN AMX)" if cpu_projection._INT8_PRODUCT else "float32"
    header = [
        f"# CPU projection: random matrix regenerated per call vs cached, {today}{' (--quick)' if args.quick else ''}",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads); Rademacher product: {product}.",
        f"Load average (1 min) at start / end: {load_before:.1f} / {os.getloadavg()[0]:.1f} (shared cores: times are "
        f"min (median) of {args.repeats} interleaved rounds; compare the ratios).",
        f"Cache limit {limit / 2**30:.0f} GiB (default). Each row is a fresh process; peak RSS is its peak "
        "resident memory (VmHWM) at the end of the rounds: Python, torch, the gradients, both paths and the cache "
        "entry.",
        "",
    ]
    text = "\n".join(header + rows) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"projection-cache-{today}{'-quick' if args.quick else ''}.md"
    path.write_text(text)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
