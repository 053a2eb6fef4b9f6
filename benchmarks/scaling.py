"""How the cost grows: featurisation against model size, the store and exact top-k against
training rows, and search against the number of queries.

    nice -n 10 python benchmarks/scaling.py                     # all three axes
    nice -n 10 python benchmarks/scaling.py --rows 1e3,1e4,1e5  # a shorter rows axis

Three axes, every measurement in a fresh process (so that its peak resident memory, VmHWM,
is its own), one thread (torch, faiss, BLAS):

1. parameters: GPT-2 shapes of about 1M, 10M, 30M and 124M parameters (``benchmarks/factored.py``'s
   ``SIZES``; 124M is GPT-2 small, n_embd 768, 12 layers, 12 heads, vocabulary 50257), the
   factored projection (4 Kronecker terms) at k = 1024, one checkpoint, 16 sequences of 64
   tokens: ``factored.py``'s own measurement (``featurize_rows``, fastest of 2 calls).
2. training rows: N rows of k = 1024 synthetic features (``benchmarks/retrieval.py``'s
   clustered, log-normal-norm rows) written to a float16 feature store by ``featurize`` (the
   store's public writing path: checks, scaling, zarr chunks of 4096 rows, ledger), against
   generating the same rows alone; then the store reopened and the exact top-10 proponents of
   16 queries (``exact_topk``, default settings, best of 3).
3. queries: Q query feature rows against the 1e5-row store of axis 2, exact top-10: the search
   alone (query featurisation excluded: it costs what featurising Q training rows does, axis 1).

The table is written, with date, machine and load, to ``benchmarks/results/scaling-<date>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from retrieval import PeakRSS, Spec, SyntheticFeatures, machine, timed  # the retrieval benchmark's helpers

ROOT = Path(__file__).resolve().parent
SIZES = ("1M", "10M", "30M", "124M")
ROWS = (1_000, 10_000, 100_000, 1_000_000)
QUERIES = (1, 16, 256, 4096)
DIM, CHUNK_ROWS, TOP, QUERY_ROWS, REPEATS = 1024, 4096, 10, 16, 3
QUERY_STORE_ROWS = 100_000  # the store of axis 3
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def _spec(n_rows: int, n_queries: int) -> Spec:
    return Spec(n_rows, DIM, n_queries, 0, 1000, CHUNK_ROWS, 65536)


def _one_thread() -> None:
    import faiss
    import torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)


def _store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not in /proc/self/status")


def _search(path: Path, n_queries: int) -> dict:
    """Exact top-10 of ``n_queries`` synthetic queries over the store at ``path``: best of
    ``REPEATS`` calls (one when a call takes over a minute) and the peak memory of the first."""
    from source_proj.features.store import FeatureStore
    from source_proj.retrieval.exact import exact_topk

    store = FeatureStore.open(path)
    queries = SyntheticFeatures(_spec(store.layout.n_rows, n_queries)).rows(0, n_queries, stream=1)
    times = []
    with PeakRSS() as mem:
        times.append(timed(lambda: exact_topk(store, queries, TOP, progress=False))[0])
    while len(times) < REPEATS and times[0] < 60:
        times.append(timed(lambda: exact_topk(store, queries, TOP, progress=False))[0])
    return {"search_s": min(times), "search_peak": mem.peak, "search_start": mem.start}


def measure_rows(n_rows: int, workdir: Path) -> dict:
    """Axis 2 in this process: write N rows to a float16 store, time generating them alone,
    then search 16 queries."""
    from source_proj.features.featurize import featurize
    from source_proj.features.layout import StoreLayout
    from source_proj.features.store import FeatureStore

    _one_thread()
    synthetic = SyntheticFeatures(_spec(n_rows, QUERY_ROWS))
    path = workdir / f"rows-{n_rows}.zarr"
    store = FeatureStore.create(path, StoreLayout(n_rows, DIM, "float16", CHUNK_ROWS), {"benchmark": "scaling"})
    with PeakRSS() as mem:
        write_s, _ = timed(lambda: featurize(store, synthetic.rows, progress=False))

    def generate() -> None:
        for start in range(0, n_rows, CHUNK_ROWS):
            synthetic.rows(start, min(start + CHUNK_ROWS, n_rows))

    generate_s, _ = timed(generate)
    return {"rows": n_rows, "write_s": write_s, "generate_s": generate_s, "write_peak": mem.peak,
            "store_bytes": _store_bytes(path), **_search(path, QUERY_ROWS), "load": os.getloadavg()[0]}


def measure_queries(path: Path, n_queries: int) -> dict:
    """Axis 3 in this process: search ``n_queries`` against the store at ``path``."""
    _one_thread()
    return {"queries": n_queries, **_search(path, n_queries), "load": os.getloadavg()[0]}


def _child(*args: str) -> dict:
    """Run one measurement in a fresh process (one thread) and return its JSON line, with the
    process's peak resident memory."""
    env = {**os.environ, **ONE_THREAD}
    out = subprocess.run([sys.executable, *args], check=True, capture_output=True, text=True, env=env).stdout
    result = json.loads(out.strip().splitlines()[-1])
    print(result, flush=True)
    return result


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def parameters_table(results: list[dict]) -> list[str]:
    lines = ["| model | params | rows/s | tokens/s | s per row | peak RSS (GiB) | load |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        rows, tokens = 16, 16 * 64  # factored.py's ROWS and TOKENS
        lines.append(f"| {r['size']} | {r['params'] / 1e6:.1f}M | {rows / r['seconds']:.2f} | {tokens / r['seconds']:.0f} | "
                     f"{r['seconds'] / rows:.3f} | {_gib(r['peak_bytes'])} | {r['load']:.1f} |")
    return lines


def rows_table(results: list[dict]) -> list[str]:
    lines = [
        "| N | write (s) | rows/s written | generating alone (s) | store size (MiB) | bytes/row | "
        f"top-{TOP}, {QUERY_ROWS} queries (s) | peak RSS writing (GiB) | peak RSS top-k (GiB) | process peak (GiB) | load |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['rows']:,} | {r['write_s']:.2f} | {r['rows'] / r['write_s']:,.0f} | {r['generate_s']:.2f} | "
            f"{r['store_bytes'] / 2**20:.1f} | "
            f"{r['store_bytes'] / r['rows']:.0f} | {r['search_s']:.3f} | {_gib(r['write_peak'])} | {_gib(r['search_peak'])} | "
            f"{_gib(r['peak'])} | {r['load']:.1f} |"
        )
    return lines


def queries_table(results: list[dict]) -> list[str]:
    lines = [f"| Q | top-{TOP} search (s) | ms per query | peak RSS (GiB) | process peak (GiB) | load |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['queries']:,} | {r['search_s']:.3f} | {1e3 * r['search_s'] / r['queries']:.2f} | "
                     f"{_gib(r['search_peak'])} | {_gib(r['peak'])} | {r['load']:.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", nargs="?", default="all", choices=["all", "_rows", "_queries"])
    parser.add_argument("args", nargs="*")
    parser.add_argument("--sizes", default=",".join(SIZES), help="model sizes of axis 1 (empty: skip)")
    parser.add_argument("--rows", default=",".join(str(n) for n in ROWS), help="N of axis 2, e.g. 1e3,1e4")
    parser.add_argument("--queries", default=",".join(str(q) for q in QUERIES), help="Q of axis 3 (empty: skip)")
    parser.add_argument("--dir", type=Path, default=None, help="where the temporary stores go (default: /tmp)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / f"scaling-{datetime.date.today()}.md")
    args = parser.parse_args()
    if args.part != "all":  # a child process: one measurement, one JSON line
        measured = measure_rows(int(args.args[0]), Path(args.args[1])) if args.part == "_rows" else (
            measure_queries(Path(args.args[0]), int(args.args[1])))
        print(json.dumps({**measured, "peak": _vm_hwm()}))
        return

    def numbers(text: str) -> list[int]:
        return [int(float(x)) for x in text.split(",") if x]

    if numbers(args.queries) and QUERY_STORE_ROWS not in numbers(args.rows):
        parser.error(f"the queries axis searches the {QUERY_STORE_ROWS:,}-row store: keep {QUERY_STORE_ROWS:g} in --rows")
    _one_thread()  # as every measurement runs: ``machine()`` reports the threads
    started, load_before = datetime.datetime.now(datetime.timezone.utc), os.getloadavg()
    params = [_child(str(ROOT / "factored.py"), "_measure", size, "factored", str(DIM), "4")
              for size in args.sizes.split(",") if size]
    workdir = Path(tempfile.mkdtemp(prefix="source-proj-scaling-", dir=args.dir))
    try:
        rows = [_child(__file__, "_rows", str(n), str(workdir)) for n in numbers(args.rows)]
        query_store = workdir / f"rows-{QUERY_STORE_ROWS}.zarr"
        queries = [_child(__file__, "_queries", str(query_store), str(q)) for q in numbers(args.queries)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    load_after = os.getloadavg()
    lines = [
        f"# Scaling: featurisation, store and search cost against parameters, rows and queries, {started.date()}",
        "",
        f"Run {started:%Y-%m-%d %H:%M} UTC, `nice -n 10`, one thread per measurement, each in a fresh process. "
        f"Machine: {machine()}.",
        "Load average (1 / 5 / 15 min) at start: {:.2f} / {:.2f} / {:.2f}; at end: {:.2f} / {:.2f} / {:.2f}; the "
        "'load' columns: 1-minute load at the end of each measurement (other jobs share the 2 cores: times are "
        "noisy).".format(*load_before, *load_after),
        "",
        "## 1. Parameters: featurisation throughput (factored, k = 1024, 4 Kronecker terms)",
        "",
        "GPT-2 shapes (`benchmarks/factored.py` SIZES: n_embd, layers, heads, vocabulary = 128/4/4/256, 256/12/8/256, "
        "512/9/8/256, 768/12/12/50257), 16 sequences of 64 tokens, one checkpoint, float32, `featurize_rows` "
        "(fastest of 2 calls; a zero curvature, which does not change the cost). Peak = VmHWM of the process "
        "(model, Python and torch included).",
        "",
        *parameters_table(params),
        "",
        f"## 2. Training rows: float16 store of k = {DIM} features, then exact top-{TOP} of {QUERY_ROWS} queries",
        "",
        "Synthetic rows (`benchmarks/retrieval.py`'s clustered rows) written by `featurize` in chunks of "
        f"{CHUNK_ROWS} rows (the write includes generating them; the store writes a chunk while the next is "
        "generated, so 'generating alone', the same rows generated and dropped, overlaps the write rather than adding "
        f"to it: their gap is the store's cost that the overlap does not hide). A store pads its last chunk to {CHUNK_ROWS} rows. Top-{TOP}: `exact_topk` with default settings on the "
        f"reopened store, best of {REPEATS} calls ({QUERY_ROWS} queries: below 128, so float32 products without "
        "the bf16 screen). Peak RSS writing / top-k: VmHWM reset before each; process peak: the whole process.",
        "",
        *rows_table(rows),
        "",
        f"## 3. Queries: exact top-{TOP} against the {QUERY_STORE_ROWS:,}-row store of section 2",
        "",
        "Query feature rows given (query featurisation excluded: per query it costs what one training row's "
        "featurisation does, section 1). `exact_topk` with default settings, best of "
        f"{REPEATS} calls (one when a call takes over a minute); from 128 queries on, where the CPU has AMX "
        "bf16 units, it screens in bfloat16 and rescores in float32 (same results).",
        "",
        *queries_table(queries),
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
