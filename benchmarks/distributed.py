"""Distributed featurisation benchmark: rows/s of the curvature pass and of featurisation into
a feature store on 1 and 2 ``torchrun`` processes (gloo, one thread each), in one run.

The driver trains a 64-512-512-10 MLP once (synthetic blobs, SGD + momentum, checkpoints kept
in --workdir), then launches ``torchrun --nproc-per-node N benchmarks/distributed.py _worker``
for each N; rank 0 of each run times ``prepare`` (curvature) and ``featurize`` and the driver
checks that every store is bit-identical to the one-process store before printing the table:
seconds, rows/s, speed-up over one process and parallel efficiency (speed-up / N). Memory and
traffic per rank are stated beside it (k x k float64 per tree node, O(log chunks) nodes per
rank and checkpoint).

Usage: ``python benchmarks/distributed.py [--rows 2048] [--procs 1 2] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve()
DIMS = (64, 512, 512, 10)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIMS[0], DIMS[1]), nn.ReLU(), nn.Linear(DIMS[1], DIMS[2]), nn.ReLU(),
                         nn.Linear(DIMS[2], DIMS[3]))


def _data(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    centers = 3.0 * torch.randn(DIMS[-1], DIMS[0], generator=gen)
    labels = torch.randint(0, DIMS[-1], (rows,), generator=gen)
    return centers[labels] + torch.randn(rows, DIMS[0], generator=gen), labels


def _trajectory(workdir: Path, rows: int):
    from source_proj.evaluation.training import TrainSettings, train_sgd
    from source_proj.gradients.tasks import ClassificationTask

    settings = TrainSettings(epochs=3, batch_size=64, lr=0.05, momentum=0.9, weight_decay=1e-4,
                             checkpoints_per_epoch=2, seed=0)
    ckpts = train_sgd(_model(), ClassificationTask(), *_data(rows), settings, checkpoint_dir=workdir / "checkpoints")
    return settings.trajectory(ckpts)


def worker(args: argparse.Namespace) -> None:
    from source_proj.attributor import SourceAttributor
    from source_proj.distributed.group import distributed, init_from_environment
    from source_proj.store_fit import fit_store

    with distributed(init_from_environment()) as group:
        torch.manual_seed(0)
        trajectory = _trajectory_from_disk(args.workdir)
        attributor = SourceAttributor(_model(), "classification", trajectory, proj_dim=args.proj_dim, chunk_size=64,
                                      curvature_examples=args.curvature_examples, progress=False)
        times = {}
        original = attributor.prepare

        def timed_prepare(*a, **kw):
            t0 = time.perf_counter()
            out = original(*a, **kw)
            times["curvature"] = time.perf_counter() - t0
            return out

        attributor.prepare = timed_prepare
        t0 = time.perf_counter()
        fit_store(attributor, _data(args.rows), args.store, chunk_rows=128)
        times["total"] = time.perf_counter() - t0
        times["features"] = times["total"] - times["curvature"]
        if group.is_main:
            Path(args.result).write_text(json.dumps(times))


def _trajectory_from_disk(workdir: Path):
    from source_proj.trajectory.checkpoints import Checkpoint, Trajectory

    manifest = json.loads((workdir / "trajectory.json").read_text())
    ckpts = tuple(Checkpoint(c["path"], steps=c["steps"], lr=c["lr"]) for c in manifest["checkpoints"])
    return Trajectory(ckpts, optimizer="momentum", momentum=manifest["momentum"], weight_decay=manifest["weight_decay"])


def _arrays(path: Path) -> dict[str, np.ndarray]:
    import zarr

    return {name: np.asarray(a[...]) for name, a in zarr.open_group(path, mode="r").arrays()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048, help="training rows featurised")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts to compare")
    parser.add_argument("--proj-dim", type=int, default=512)
    parser.add_argument("--curvature-examples", type=int, default=512)
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/cache/distributed"))
    parser.add_argument("--out", type=Path, help="also write the table (markdown) to this file")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if not (args.workdir / "trajectory.json").is_file():
        trajectory = _trajectory(args.workdir, args.rows)
        manifest = {"momentum": trajectory.momentum, "weight_decay": trajectory.weight_decay,
                    "checkpoints": [{"path": c.state, "steps": c.steps, "lr": c.lr} for c in trajectory.checkpoints]}
        (args.workdir / "trajectory.json").write_text(json.dumps(manifest))
    results, stores = {}, {}
    for n in args.procs:
        store = args.workdir / f"store-{n}.zarr"
        subprocess.run(["rm", "-rf", str(store)], check=True)
        result = args.workdir / f"times-{n}.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                   str(HERE), "_worker", "--rows", str(args.rows), "--proj-dim", str(args.proj_dim),
                   "--curvature-examples", str(args.curvature_examples), "--workdir", str(args.workdir),
                   "--store", str(store), "--result", str(result)]
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        results[n], stores[n] = json.loads(result.read_text()), store
    reference = _arrays(stores[args.procs[0]])
    for n in args.procs[1:]:
        other = _arrays(stores[n])
        assert all(np.array_equal(reference[k], other[k]) for k in reference), f"{n}-process store differs"
    base = results[args.procs[0]]
    params = sum(p.numel() for p in _model().parameters())
    lines = [
        f"# Distributed featurisation ({time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; gloo, one thread per process)",
        "",
        f"MLP {DIMS} ({params} parameters), {args.rows} rows, 6 checkpoints, L = 3, k = {args.proj_dim}, "
        f"{args.curvature_examples} curvature examples; every store bit-identical to the one-process store.",
        "",
        "| processes | curvature s | features s | feature rows/s | speed-up (features) | efficiency | speed-up (total) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n in args.procs:
        r = results[n]
        speed = base["features"] / r["features"]
        lines.append(
            f"| {n} | {r['curvature']:.1f} | {r['features']:.1f} | {args.rows / r['features']:.0f} | "
            f"{speed:.2f}x | {speed / n * args.procs[0]:.2f} | {base['total'] / r['total']:.2f}x |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        parser = argparse.ArgumentParser()
        for flag in ("--rows", "--proj-dim", "--curvature-examples"):
            parser.add_argument(flag, type=int)
        parser.add_argument("--workdir", type=Path)
        parser.add_argument("--store")
        parser.add_argument("--result")
        worker(parser.parse_args(sys.argv[2:]))
    else:
        main()
