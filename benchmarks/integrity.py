"""Cost of checking every chunk read from a feature store against its digest.

    python benchmarks/integrity.py            # N = 1e6, D = 1024 float16 (~2 GB), 1000 queries
    python benchmarks/integrity.py --quick    # N = 50k: a smoke run

Every read of a store chunk (``FeatureStore._read_chunk``) hashes the stored bytes and
compares the hash with the digest recorded in the ledger when the chunk was written. This
benchmark measures what that costs on the retrieval benchmark's store (the synthetic
features of ``benchmarks/retrieval.py``), in the same run, interleaved, best of a few rounds:

- the reading path without any check (the baseline: what the store did before digests);
- the reading path as shipped (XXH3-64 of each chunk, ``source_proj.features.ledger``);
- the reading path hashing each chunk with other candidates instead: zlib's CRC-32 (what the
  ledger used before), BLAKE2b (cryptographic, from hashlib) and xxhash's XXH64; for these
  the hash is computed and not compared (a comparison of two integers is free).

Two workloads: a bare read pass over the store (``iter_blocks``: decoding only, the worst
case for the relative cost) and the benchmark's exact top-10 of 1000 queries. The table is
written, with date and machine, to ``benchmarks/results/integrity-<date>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import shutil
import sys
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import xxhash

sys.path.insert(0, str(Path(__file__).parent))
from retrieval import FULL, QUICK, SyntheticFeatures, machine, race, write_results  # noqa: E402

from source_proj.features.store import FeatureStore, StoreLayout, featurize  # noqa: E402
from source_proj.retrieval.exact import SearchSettings, exact_topk  # noqa: E402

SHIPPED = FeatureStore._read_chunk


def _unchecked(self: FeatureStore, index: int, names, expected) -> list[np.ndarray]:
    start, stop = self.layout.chunk_range(index)
    return [self._array(name)[start:stop] for name in names]


def _hashing(hash_bytes: Callable[[memoryview], object]) -> Callable:
    def read(self: FeatureStore, index: int, names, expected) -> list[np.ndarray]:
        parts = _unchecked(self, index, names, expected)
        for part in parts:
            hash_bytes(memoryview(np.ascontiguousarray(part)).cast("B"))
        return parts

    return read


READERS = {
    "no check (baseline)": _unchecked,
    "XXH3-64, checked (shipped)": SHIPPED,
    "zlib CRC-32": _hashing(zlib.crc32),
    "xxhash XXH64": _hashing(xxhash.xxh64_intdigest),
    "BLAKE2b-128": _hashing(lambda b: hashlib.blake2b(b, digest_size=16).digest()),
}


def _with_reader(reader: Callable, work: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        FeatureStore._read_chunk = reader
        try:
            return work()
        finally:
            FeatureStore._read_chunk = SHIPPED

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small N (50k) for a smoke run")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the temporary store (default: /tmp)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (best time kept)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="directory of the results file")
    args = parser.parse_args()
    spec = QUICK if args.quick else FULL
    workdir = Path(tempfile.mkdtemp(prefix="source-proj-integrity-", dir=args.dir))
    load_before = os.getloadavg()[0]
    try:
        synthetic = SyntheticFeatures(spec)
        layout = StoreLayout(spec.n_rows, spec.dim, "float16", spec.chunk_rows)
        store = FeatureStore.create(workdir / "features.zarr", layout, {"benchmark": "synthetic", "seed": spec.seed})
        featurize(store, synthetic.rows, progress=False)
        store = FeatureStore.open(store.path)
        queries = synthetic.rows(0, spec.n_queries, stream=1)
        settings = SearchSettings(shard_rows=spec.shard_rows)

        def read_pass() -> int:
            return sum(block.shape[0] for _, block in store.iter_blocks(spec.shard_rows, reuse_buffers=True))

        def search():
            return exact_topk(store, queries, spec.k, settings=settings, progress=False)

        reads = race({name: _with_reader(r, read_pass) for name, r in READERS.items()}, args.repeats)
        searches = race({name: _with_reader(r, search) for name, r in READERS.items()}, args.repeats)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    load_after = os.getloadavg()[0]

    base_read, base_search = reads["no check (baseline)"][0], searches["no check (baseline)"][0]
    same = all(np.array_equal(r[1].ids, searches["no check (baseline)"][1].ids) for r in searches.values())
    gb = spec.n_rows * spec.dim * 2 / 1e9
    rows = [
        f"| {name} | {reads[name][0]:.2f} | {100 * (reads[name][0] / base_read - 1):+.1f}% | "
        f"{searches[name][0]:.2f} | {100 * (searches[name][0] / base_search - 1):+.1f}% |"
        for name in READERS
    ]
    today = datetime.date.today().isoformat()
    text = "\n".join([
        f"# Digest-on-read cost, {today}{' (--quick)' if args.quick else ''}",
        "",
        f"Machine: {machine()}",
        f"Load average (1 min) at start / end: {load_before:.1f} / {load_after:.1f} (cores shared with other "
        "processes: best of interleaved rounds, compare ratios).",
        "",
        f"Store: N = {spec.n_rows}, D = {spec.dim}, float16 ({gb:.2f} GB of features read per pass), chunks of "
        f"{spec.chunk_rows} rows, shards of {spec.shard_rows}; exact top-{spec.k} of {spec.n_queries} queries "
        f"(default settings). Best of {args.repeats} interleaved rounds.",
        "",
        "| chunk check on every read | read pass (s) | vs no check | exact top-k (s) | vs no check |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Top-k ids identical under every reader: {same}.",
    ]) + "\n"
    write_results(text, args.out, f"integrity-{today}{'-quick' if args.quick else ''}")


if __name__ == "__main__":
    main()
