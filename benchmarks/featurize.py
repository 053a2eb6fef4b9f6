"""Featurisation benchmark: one projection per segment against one per checkpoint, in one run.

SourceAttributor sums each example's gradients over a segment's checkpoints before projecting
them (the projection is linear, and the features only need the segment means), so a chunk of
rows costs L projections (plus one at the final checkpoint in "final" query mode) instead of C.
The baseline projects every checkpoint's gradients and sums the projections, as the library
did before; both use the same loaded checkpoints, rows and chunk size, and must give the same
segment means (checked to float32 round-off). The table reports seconds and the speed ratio.

Usage: ``python benchmarks/featurize.py [--rows 512] [--threads 2] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from torch import nn

from source_proj.attributor import SourceAttributor
from source_proj.evaluation.training import TrainSettings, train_sgd
from source_proj.gradients.tasks import ClassificationTask
from source_proj.projection.projected import projected_gradients


def segment_means_per_checkpoint(att: SourceAttributor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Baseline: (n, L, k) segment means from one projection per checkpoint."""
    means = []
    for seg in att.segments:
        total = 0.0
        for c in seg.checkpoints:
            params, consts = att._load(c)
            total = total + projected_gradients(
                att.model_fn, [(params, consts, f"checkpoint {c}", att.preconditioner.sqrt_scale(c))],
                att.task.loss, inputs, targets, att.projection,
            ).double()
        means.append(total / len(seg.checkpoints))
    return torch.stack(means, dim=1)


def segment_means_summed(att: SourceAttributor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The library's way: (n, L, k) segment means from one projection per segment."""
    return torch.stack(
        [att._projected_sum(seg.checkpoints, att.task.loss, inputs, targets).double() / len(seg.checkpoints)
         for seg in att.segments],
        dim=1,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512, help="training rows featurised")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    x, y = torch.randn(args.rows, 256), torch.randint(0, 10, (args.rows,))
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    settings = TrainSettings(epochs=12, batch_size=64, lr=0.05, momentum=0.9, weight_decay=1e-4,
                             checkpoints_per_epoch=1, seed=0)
    trajectory = settings.trajectory(train_sgd(model, ClassificationTask(), x, y, settings))
    p = sum(q.numel() for q in model.parameters())
    header = (f"Featurisation benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
              f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
              f"torch {torch.__version__}; MLP 256-512-512-10 (p = {p}), {len(trajectory.checkpoints)} "
              f"checkpoints, {args.rows} rows, k = 1024")
    rows = [header, "", "| chunk | L | per checkpoint (s) | per segment (s) | speed-up | max rel. difference |",
            "|---|---|---|---|---|---|"]
    print("\n".join(rows), flush=True)
    for chunk in (64, 256):
        for num_segments in (3, 1):
            att = SourceAttributor(model, "classification", trajectory, proj_dim=1024, num_segments=num_segments,
                                   chunk_size=chunk, progress=False)
            times, results = {}, {}
            for name, fn in (("checkpoint", segment_means_per_checkpoint), ("segment", segment_means_summed)):
                start = time.perf_counter()
                results[name] = torch.cat([fn(att, x[s : s + chunk], y[s : s + chunk]) for s in range(0, args.rows, chunk)])
                times[name] = time.perf_counter() - start
            diff = float((results["segment"] - results["checkpoint"]).abs().max() / results["checkpoint"].abs().max())
            row = (f"| {chunk} | {num_segments} | {times['checkpoint']:.2f} | {times['segment']:.2f} "
                   f"| {times['checkpoint'] / times['segment']:.2f}x | {diff:.1e} |")
            rows.append(row)
            print(row, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
