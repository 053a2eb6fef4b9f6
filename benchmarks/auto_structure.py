"""Featurisation time of the three projection structures on small GPT-2 shapes: the evidence
for ``proj_structure="auto"``'s threshold (``projection.options.AUTO_DENSE_MAX_PARAMS``).

    nice -n 10 python benchmarks/auto_structure.py [--out FILE]

Each row: a GPT-2 from a config (byte vocabulary, 64 tokens, 16 sequences, one checkpoint,
float32, one thread), ``featurize_rows`` timed by ``factored.measure`` (fastest of two calls;
zero curvature), for "dense", "grouped" (shares measured on the same rows) and "factored" (4
Kronecker terms) at the same total k = 1024, each in a fresh process (so that its peak
resident memory, VmHWM, is its own: model, gradients, projection). Dense is skipped above 1M
parameters (minutes a call).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import factored
import torch

SHAPES = {"36k": (32, 2, 2, 256), "121k": (64, 2, 2, 256), "366k": (96, 3, 4, 256), "834k": (128, 4, 4, 256),
          "10M": factored.SIZES["10M"]}
STRUCTURES = ("dense", "grouped", "factored")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=factored.ROOT / "results" / f"auto-structure-grouped-{datetime.date.today()}.md")
    parser.add_argument("measure", nargs="*", help=argparse.SUPPRESS)  # internal: SIZE STRUCTURE, in a fresh process
    args = parser.parse_args()
    factored.SIZES.update(SHAPES)
    if args.measure:
        print(json.dumps(factored.measure(args.measure[0], args.measure[1], 1024, 4)))
        return
    rows = []
    for size in SHAPES:
        found = {}
        for structure in STRUCTURES:
            if structure == "dense" and size == "10M":
                continue
            command = [sys.executable, __file__, size, structure]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            found[structure] = json.loads(output.strip().splitlines()[-1])
            print(size, structure, f"{found[structure]['seconds'] / factored.ROWS * 1e3:.1f} ms/row", flush=True)
        rows.append(found)
    lines = [
        f"# Featurisation time by projection structure on small GPT-2 shapes (`proj_structure=\"auto\"`), "
        f"{datetime.date.today()}",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, one torch thread, "
        f"`nice -n 10`, 1-minute load average {min(r['load'] for f in rows for r in f.values()):.1f}-"
        f"{max(r['load'] for f in rows for r in f.values()):.1f}; torch {torch.__version__}. How: "
        "`benchmarks/auto_structure.py` (its docstring).",
        "",
        "| shape (n_embd, n_layer, n_head) | params | dense ms/row | grouped ms/row | factored ms/row | dense / factored "
        "| grouped / factored | peak RSS, MiB (dense / grouped / factored) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for size, found in zip(SHAPES, rows):
        ms = {s: found[s]["seconds"] / factored.ROWS * 1e3 if s in found else None for s in STRUCTURES}
        cell = {s: "-" if v is None else f"{v:.1f}" for s, v in ms.items()}
        ratio = {s: "-" if ms[s] is None else f"{ms[s] / ms['factored']:.1f}x" for s in ("dense", "grouped")}
        width, layers, heads, _ = SHAPES[size]
        peaks = " / ".join(f"{found[s]['peak_bytes'] / 2**20:.0f}" if s in found else "-" for s in STRUCTURES)
        lines.append(f"| {width}, {layers}, {heads} | {found['factored']['params']:,} | {cell['dense']} | "
                     f"{cell['grouped']} | {cell['factored']} | {ratio['dense']} | {ratio['grouped']} | {peaks} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
