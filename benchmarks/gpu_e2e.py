"""End-to-end check on a CUDA device: SourceAttributor with the Triton projection (auto
dispatch) against the same run on the CPU path, on the digits demo model.

Usage: python benchmarks/gpu_e2e.py [--out DIR]. Prints relative error and top-10 overlap
of the scores, and the wall time of fit on each path (same process, same data). Without a
GPU, ``TRITON_INTERPRET=1 python benchmarks/gpu_e2e.py --interpret --train-rows 48
--proj-dim 32`` checks the script itself with the interpreted kernel on CPU tensors.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from source_proj.attributor import SourceAttributor
from source_proj.cli.demo import DIGITS_SETTINGS, digits_data, digits_model
from source_proj.evaluation.training import train_sgd
from source_proj.gradients.tasks import ClassificationTask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None, help="folder for the JSON result")
    parser.add_argument("--proj-dim", type=int, default=1024)
    parser.add_argument("--train-rows", type=int, default=None, help="attribute to the first N rows only")
    parser.add_argument("--interpret", action="store_true",
                        help="no GPU: run the Triton kernel on CPU tensors (TRITON_INTERPRET=1 must be set)")
    args = parser.parse_args()
    if not (args.interpret or torch.cuda.is_available()):
        sys.exit("no CUDA device")
    (x, y), (xt, yt) = digits_data()
    x, y = x[: args.train_rows], y[: args.train_rows]
    model = digits_model()
    traj = DIGITS_SETTINGS.trajectory(train_sgd(model, ClassificationTask(), x, y, DIGITS_SETTINGS))
    queries = (xt[:64], yt[:64])
    results = {}
    triton_device = "cpu" if args.interpret else "cuda"
    for name, device, backend in (("triton", triton_device, "triton"), ("cpu", "cpu", "cpu")):
        att = SourceAttributor(model.to(device), "classification", traj, proj_dim=args.proj_dim,
                               device=device, backend=backend, progress=False, chunk_size=256)
        start = time.perf_counter()
        att.fit((x, y))
        scores = att.score(queries).cpu()
        if device == "cuda":
            torch.cuda.synchronize()
        results[name] = (scores, time.perf_counter() - start)
    gpu, cpu = results["triton"][0], results["cpu"][0]
    rel = float((gpu - cpu).norm() / cpu.norm())
    top_g, top_c = gpu.topk(10, dim=1).indices, cpu.topk(10, dim=1).indices
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top_g, top_c)) / top_g.numel()
    summary = {
        "device": "CPU (Triton interpreter)" if args.interpret else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "proj_dim": args.proj_dim,
        "relative_error_gpu_vs_cpu": rel,
        "top10_overlap": overlap,
        "fit_seconds_triton": results["triton"][1],
        "fit_seconds_cpu_path": results["cpu"][1],
    }
    print("| check | value |\n| --- | --- |")
    for key, value in summary.items():
        print(f"| {key} | {value} |")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_e2e.json").write_text(json.dumps(summary, indent=1))
    ok = rel < 1e-3 and overlap > 0.95
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
