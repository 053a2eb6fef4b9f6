"""Language models: featurisation throughput and memory, and LDS on a tiny LM.

    python benchmarks/lm.py throughput   # GPT-2 shapes of ~1M, 10M, 30M parameters, k in {1024, 4096}
    python benchmarks/lm.py lds          # SOURCE vs TracIn / influence functions / TRAK on a tiny LM
    python benchmarks/lm.py lds --quick  # smoke run of the LDS part

Throughput: for each model size, a fresh process (so that its peak resident memory, VmHWM,
is its own) times (1) the bare per-example gradient pass at one checkpoint
(``per_example_gradients``: the floor, what any gradient-based attribution pays) and (2)
SOURCE's featurisation of the same sequences at that checkpoint (``featurize_rows``: the
gradients, the projection to k and the bookkeeping). Ratios are within one process run; the
machine is shared, so absolute numbers are noisy. Byte-level vocabulary (256), 64 tokens
per sequence, eager attention, float32, CPU.

LDS: a 1-layer GPT-2 (vocabulary 12) trained with SGD on 100 sequences drawn from a few
motifs with noise; measurement: the loss of 10 held-out sequences; ground truth by
retraining on M half-size subsets R times each (``source_proj.evaluation``); every method
uses the same projected gradients and Hessians (``project_run``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
SIZES = {"1M": (128, 4, 4), "10M": (256, 12, 8), "30M": (512, 9, 8)}  # n_embd, n_layer, n_head
DIMS = (1024, 4096)
TOKENS, ROWS = 64, 16


def gpt2(width: int, layers: int, heads: int, vocab: int, positions: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=width, n_layer=layers, n_head=heads,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                        attn_implementation="eager")
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def peak_rss() -> int:
    """This process's peak resident memory (VmHWM), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


# ------------------------------------------------------------------ throughput
def measure(size: str, mode: str, dim: int) -> dict:
    """One measurement in this process: mode "bare" (per-example gradients) or "source"."""
    from source_proj.attributor import SourceAttributor
    from source_proj.gradients.causal_lm import CausalLMTask
    from source_proj.gradients.data import as_examples
    from source_proj.gradients.per_example import loss_objective, per_example_gradients
    from source_proj.trajectory.checkpoints import Checkpoint, Trajectory

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    model = gpt2(*SIZES[size], vocab=256, positions=TOKENS)
    p = sum(q.numel() for q in model.parameters())
    ids = torch.randint(0, 256, (ROWS, TOKENS), generator=torch.Generator().manual_seed(0))
    data = {"input_ids": ids}
    traj = Trajectory((Checkpoint(model.state_dict(), steps=1, lr=0.1),))
    att = SourceAttributor(model, CausalLMTask(), traj, proj_dim=max(dim, 1), num_segments=1, progress=False,
                           chunk_size=ROWS, max_gradient_memory="16GiB")
    examples = as_examples(data)
    inputs, targets = examples.rows(0, ROWS)
    if mode == "bare":
        params, consts = att._load(0)
        start = time.perf_counter()
        per_example_gradients(att.model_fn, params, consts, loss_objective(att.task.loss), inputs, targets)
        seconds = time.perf_counter() - start
    else:
        att.prepare(data)  # curvature (not timed): one sampled factor row per sequence
        start = time.perf_counter()
        att.featurize_rows(examples, 0, ROWS)
        seconds = time.perf_counter() - start
    return {"size": size, "mode": mode, "dim": dim, "params": p, "seconds": seconds, "peak_bytes": peak_rss(),
            "load": os.getloadavg()[0]}


def throughput(out: Path, sizes: list[str]) -> None:
    """Measure every size and pass in fresh processes; the table is rewritten after each one
    (an interrupted run keeps what it measured)."""
    results = []
    for size in sizes:
        for mode, dim in [("bare", 0), *(("source", d) for d in DIMS)]:
            cmd = [sys.executable, __file__, "_measure", size, mode, str(dim)]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results.append(json.loads(line))
            print(results[-1], flush=True)
            write_throughput_table(results, out)
    print(out.read_text())


def write_throughput_table(results: list[dict], out: Path) -> None:
    """The markdown table of ``measure`` results (ratios against the same size's bare pass)."""
    lines = [
        f"# LM featurisation throughput (CPU), {datetime.date.today()}",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
        f"1-minute load average {min(r['load'] for r in results):.1f}-{max(r['load'] for r in results):.1f} at the "
        f"end of the measurements, torch {torch.__version__}. GPT-2 shapes, byte vocabulary, {TOKENS} tokens "
        f"per sequence, {ROWS} sequences per batch, one checkpoint, float32. 'bare' = per-example gradients "
        "only; 'SOURCE k' = featurize_rows (gradients + projection to k + bookkeeping). Peak = VmHWM of a "
        "fresh process (includes the model, Python and torch).",
        "",
        "| model | params | pass | seq/s | tokens/s | time vs bare | peak RSS |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    bare = {r["size"]: r["seconds"] for r in results if r["mode"] == "bare"}
    for r in results:
        name = "bare gradients" if r["mode"] == "bare" else f"SOURCE k={r['dim']}"
        lines.append(
            f"| {r['size']} | {r['params'] / 1e6:.2f}M | {name} | {ROWS / r['seconds']:.2f} | "
            f"{ROWS * TOKENS / r['seconds']:.0f} | {r['seconds'] / bare[r['size']]:.2f}x | "
            f"{r['peak_bytes'] / 2**30:.2f} GiB |"
        )
    out.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------- LDS
VOCAB, LENGTH, N_TRAIN, N_QUERY = 12, 12, 100, 10


def lds_rows(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train ids (N, T), query ids (Q, T)): noisy copies of 4 motifs."""
    gen = torch.Generator().manual_seed(seed)
    motifs = torch.randint(0, VOCAB, (4, LENGTH), generator=gen)
    ids = motifs[torch.arange(N_TRAIN + N_QUERY) % 4].clone()
    flips = torch.rand(ids.shape, generator=gen) < 0.25
    ids[flips] = torch.randint(0, VOCAB, (int(flips.sum()),), generator=gen)
    return ids[:N_TRAIN], ids[N_TRAIN:]


def lds_settings():
    from source_proj.evaluation.training import TrainSettings

    return TrainSettings(epochs=8, batch_size=10, lr=0.5, momentum=0.0, weight_decay=1e-3, checkpoints_per_epoch=1)


def lds_task():
    from source_proj.gradients.causal_lm import CausalLMTask

    return CausalLMTask(reduction="mean", measure="loss")


def lds_train(indices: np.ndarray, seed: int):
    from source_proj.evaluation.training import train_sgd

    train, _ = lds_rows()
    model = gpt2(16, 1, 2, vocab=VOCAB, positions=LENGTH, seed=seed)
    settings = lds_settings()
    settings = type(settings)(**{**settings.__dict__, "seed": seed})
    idx = torch.as_tensor(indices)
    ckpts = train_sgd(model, lds_task(), train[idx], train[idx], settings)
    return model, settings.trajectory(ckpts)


def lds_retrain(indices: np.ndarray, seed: int) -> np.ndarray:
    """Query losses (Q,) of a model retrained on ``indices`` with ``seed``."""
    torch.set_num_threads(1)
    model, _ = lds_train(indices, seed)
    _, queries = lds_rows()
    with torch.no_grad():
        return lds_task().measurement(model(queries).logits, queries).numpy()


def lds(out: Path, quick: bool) -> None:
    from source_proj.config import SourceConfig
    from source_proj.evaluation import (
        LDSConfig,
        compute_ground_truth,
        linear_datamodeling_score,
    )
    from source_proj.evaluation.baselines import (
        influence_scores,
        source_scores,
        tracin_scores,
        trak_scores,
    )
    from source_proj.evaluation.projected_run import project_run

    config = LDSConfig(num_subsets=12 if quick else 60, repeats=2 if quick else 3)
    started = time.time()
    truth = compute_ground_truth(
        partial(lds_retrain), N_TRAIN, config, cache_path=ROOT / "cache" / f"lm-lds-{config.num_subsets}.npz",
        setup_key=f"lm-lds-v1-{VOCAB}-{LENGTH}-{N_TRAIN}",
    )
    model, traj = lds_train(np.arange(N_TRAIN), seed=10_000)
    train, queries = lds_rows()
    k = 512
    run = project_run(model, lds_task(), traj, {0: (train, train)}, 0, (queries, queries), k, seed=0,
                      curvature_modes=("exact", "sampled"), progress=False)
    methods = {
        "SOURCE, sampled curvature (LM default), per-segment query": source_scores(run, SourceConfig(proj_dim=k)),
        "SOURCE, exact curvature, per-segment query": source_scores(run, SourceConfig(proj_dim=k, curvature="exact")),
        "SOURCE, sampled curvature, paper form (final query)": source_scores(
            run, SourceConfig(proj_dim=k, query_mode="final")),
        "TracIn": tracin_scores(run),
        "TRAK (single model)": trak_scores(run),
    }
    for damping in (1e-3, 1e-2, 1e-1, 1.0):
        methods[f"influence functions, damping {damping:g}"] = influence_scores(run, damping)
    p = sum(q.numel() for q in model.parameters())
    lines = [
        f"# LDS on a tiny language model, {datetime.date.today()}",
        "",
        f"1-layer GPT-2 (width 16, vocabulary {VOCAB}, {p:,} parameters, tied head), {N_TRAIN} training sequences "
        f"of {LENGTH} tokens (noisy copies of 4 motifs), SGD lr 0.5, 8 epochs, batch 10, weight decay 1e-3, one "
        f"checkpoint per epoch. Measurement: mean token loss of {N_QUERY} held-out sequences. Ground truth: "
        f"M = {config.num_subsets} half-size subsets x R = {config.repeats} retrainings. All methods use the "
        f"same projected gradients (k = {k}). 95% bootstrap intervals over subsets.",
        "",
        "| method | LDS | 95% CI |",
        "| --- | --- | --- |",
    ]
    for name, scores in methods.items():
        result = linear_datamodeling_score(np.asarray(scores, dtype=np.float64), truth)
        lines.append(f"| {name} | {result.score:.3f} | [{result.ci_low:.3f}, {result.ci_high:.3f}] |")
    lines.append("")
    lines.append(f"Total time {time.time() - started:.0f} s (ground truth cached under benchmarks/cache/).")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["throughput", "lds", "_measure"])
    parser.add_argument("args", nargs="*")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", default=",".join(SIZES), help="model sizes of the throughput part")
    args = parser.parse_args()
    results = ROOT / "results"
    if args.part == "_measure":
        size, mode, dim = args.args
        print(json.dumps(measure(size, mode, int(dim))))
    elif args.part == "throughput":
        throughput(results / "lm-throughput-cpu.md", args.sizes.split(","))
    else:
        lds(results / ("lm-lds-quick.md" if args.quick else "lm-lds.md"), args.quick)


if __name__ == "__main__":
    main()
