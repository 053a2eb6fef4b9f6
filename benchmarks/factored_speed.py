"""Factored featurisation of one checkpoint against a plain batched forward+backward (issue #27).

    python benchmarks/factored_speed.py                      # 10M and 30M GPT-2 shapes, table to stdout
    python benchmarks/factored_speed.py --sizes 1M,10M,30M --out FILE
    python benchmarks/factored_speed.py profile --sizes 10M  # torch.profiler of one featurize_rows call

Per size, in one process (a fresh one per size, so that its peak resident memory is its
own), on the same ROWS sequences of TOKENS byte tokens:

(a) plain: ``model(input_ids=ids, labels=ids).loss.backward()`` over the batch (what training
    pays per step);
(a0) plain, factored weights frozen: the same with the weights that the factored projection
    taps set ``requires_grad=False``: forward + backward to the activations (and to the
    biases and norms), no weight gradient: the floor of any pass that never forms them;
(b) bare: ``per_example_gradients`` of every parameter (vmap + grad; the per-example floor of
    the dense structure);
(b0) untapped: ``per_example_gradients`` of the parameters the factored projection does not
    tap (biases, norms), the tapped weights held constant and no hooks: (b0) - (a0) is what
    the per-example batching (``vmap``) costs, (c) - (b0) what the hooks and the
    bookkeeping of the featurisation add;
(c) factored: ``SourceAttributor.featurize_rows`` with ``proj_structure="factored"`` at one
    checkpoint (k and Kronecker terms below; zero curvature, as ``factored.py`` sets it).

The four are timed in turn, REPEATS times, the fastest of each counting (interleaved, so a
load change on the shared machine hits all alike); one torch thread. Wall time and the
process's CPU time (``time.process_time``: on a machine shared by more runnable jobs than
cores, wall time also counts the time the process waited for a core) are both recorded, and
the ratios are given for both. Peak RSS (VmHWM)
is read after the plain and factored passes (before the bare one, whose (B, p) gradient
buffers would dominate it) and at the end. Model shapes and the model itself come from
``factored.py`` / ``lm.py``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from factored import SIZES, TOKENS
from lm import gpt2, peak_rss

ROOT = Path(__file__).resolve().parent
ROWS, DIM, TERMS, REPEATS = 16, 1024, 4, 5


def _setup(size: str):
    """(model, ids (ROWS, TOKENS), factored attributor with zero curvature, its examples)."""
    from source_proj.attributor import SourceAttributor
    from source_proj.curvature.spectra import SegmentSpectrum
    from source_proj.gradients.causal_lm import CausalLMTask
    from source_proj.gradients.data import as_examples
    from source_proj.trajectory.checkpoints import Checkpoint, Trajectory

    width, layers, heads, vocab = SIZES[size]
    model = gpt2(width, layers, heads, vocab, positions=TOKENS)
    ids = torch.randint(0, vocab, (ROWS, TOKENS), generator=torch.Generator().manual_seed(0))
    traj = Trajectory((Checkpoint(model.state_dict(), steps=1, lr=0.1),))
    att = SourceAttributor(model, CausalLMTask(), traj, proj_dim=DIM, num_segments=1, progress=False,
                           proj_structure="factored", kronecker_terms=TERMS, chunk_size=ROWS,
                           max_gradient_memory="16GiB")
    k = att.proj_dim
    flat = [SegmentSpectrum(torch.zeros(k, dtype=torch.float64), torch.eye(k, dtype=torch.float64), seg.time)
            for seg in att.segments]
    att.set_curvature(flat, [1.0 / ROWS])
    return model, ids, att, as_examples({"input_ids": ids})


def _timed(call) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of ``call()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(size: str, threads: int = 1) -> dict:
    """The passes of the module docstring at ``size``, in this process, on ``threads`` torch threads."""
    from source_proj.gradients.per_example import loss_objective, per_example_gradients

    torch.set_num_threads(threads)
    model, ids, att, examples = _setup(size)
    p = sum(q.numel() for q in model.parameters())
    inputs, targets = examples.rows(0, ROWS)
    params, consts = att._load(0)

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    tapped = {b.name for b in att.projection_at(0).plan.blocks}
    frozen = [dict(model.named_parameters())[name] for name in tapped]

    def plain_frozen() -> None:
        for weight in frozen:
            weight.requires_grad_(False)
        try:
            plain()
        finally:
            for weight in frozen:
                weight.requires_grad_(True)

    def factored() -> None:
        rows = att.featurize_rows(examples, 0, ROWS)
        assert torch.isfinite(rows.features).all()

    def bare() -> None:
        per_example_gradients(att.model_fn, params, consts, loss_objective(att.task.loss), inputs, targets)

    untapped_params = {n: v for n, v in params.items() if n not in tapped}
    held = {**consts, **{n: params[n] for n in tapped}}

    def untapped() -> None:
        per_example_gradients(att.model_fn, untapped_params, held, loss_objective(att.task.loss), inputs, targets)

    factored()  # the first call checks the hooks against autograd once per model: not timed
    plain()
    passes = {"plain": plain, "frozen": plain_frozen, "untapped": untapped, "factored": factored, "bare": bare}
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in passes}
    peaks = {}
    for _ in range(REPEATS):
        for name, call in passes.items():
            if name == "bare":
                peaks.setdefault("before_bare", peak_rss())
            times[name].append(_timed(call))
    best = {k: min(t[0] for t in v) for k, v in times.items()}
    cpu = {f"{k}_cpu": min(t[1] for t in v) for k, v in times.items()}
    return {"size": size, "params": p, "dim": att.proj_dim, **best, **cpu,
            "peak_before_bare": peaks["before_bare"], "peak": peak_rss(), "load": os.getloadavg()[0], "threads": threads}


def profile(size: str, top: int) -> str:
    """torch.profiler's table (self CPU time) of one factored ``featurize_rows`` call."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(1)
    _, _, att, examples = _setup(size)
    att.featurize_rows(examples, 0, ROWS)
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        att.featurize_rows(examples, 0, ROWS)
    averages = prof.key_averages(group_by_input_shape=True)
    return averages.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40,
                          max_shapes_column_width=60)


def _machine() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def table(results: list[dict], label: str) -> str:
    """Markdown table of ``measure`` results (times in seconds, ratios to the plain pass)."""
    lines = [
        f"{label}: {datetime.date.today()}, {_machine()}, {results[0]['threads']} torch thread(s) of "
        f"{len(os.sched_getaffinity(0))} shared "
        f"cores, 1-minute load average {min(r['load'] for r in results):.1f}-{max(r['load'] for r in results):.1f}, "
        f"torch {torch.__version__}; {ROWS} sequences x {TOKENS} tokens, k = {DIM}, {TERMS} Kronecker terms, "
        f"fastest of {REPEATS} interleaved repeats.",
        "",
        "Times: wall / CPU seconds; ratios to (a): wall / CPU.",
        "",
        "| model | params | (a) plain fwd+bwd | (a0) weights frozen | (b0) untapped per-example | (b) bare "
        "per-example | (c) factored featurize_rows | (a0)/(a) | (b0)/(a) | (b)/(a) | (c)/(a) | peak RSS before (b) "
        "| peak RSS |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    passes = ("frozen", "untapped", "bare", "factored")
    for r in results:
        cells = [f"{r[k]:.3f} / {r[k + '_cpu']:.3f} s" for k in ("plain", *passes)]
        ratios = [f"{r[k] / r['plain']:.2f} / {r[k + '_cpu'] / r['plain_cpu']:.2f}x" for k in passes]
        lines.append(
            f"| {r['size']} | {r['params'] / 1e6:.1f}M | " + " | ".join(cells + ratios)
            + f" | {r['peak_before_bare'] / 2**30:.2f} GiB | {r['peak'] / 2**30:.2f} GiB |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", nargs="?", default="speed", choices=["speed", "profile", "_measure"])
    parser.add_argument("--sizes", default="10M,30M")
    parser.add_argument("--label", default="factored featurisation vs plain forward+backward")
    parser.add_argument("--top", type=int, default=25, help="profile rows")
    parser.add_argument("--out", type=Path, help="append the table to this file")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the speed measurements")
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    if args.part == "_measure":
        print(json.dumps(measure(sizes[0], args.threads)))
        return
    if args.part == "profile":
        for size in sizes:
            print(f"## {size}\n\n{profile(size, args.top)}")
        return
    results = []
    for size in sizes:
        cmd = [sys.executable, __file__, "_measure", "--sizes", size, "--threads", str(args.threads)]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results.append(json.loads(line))
        print(results[-1], flush=True)
    text = table(results, args.label)
    print(text)
    if args.out:
        with args.out.open("a") as f:
            f.write(text + "\n\n")


if __name__ == "__main__":
    main()
