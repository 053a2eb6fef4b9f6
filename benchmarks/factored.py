"""Factored (Kronecker) vs dense projection: featurisation throughput and memory, and LDS.

    python benchmarks/factored.py throughput            # GPT-2 shapes of ~1M, 10M, 30M (and 124M) parameters
    python benchmarks/factored.py throughput --sizes 1M # one size
    python benchmarks/factored.py lds                   # LDS on the four scenarios of benchmarks/lds.py
    python benchmarks/factored.py lds --quick           # smoke run of the LDS part
    python benchmarks/factored.py lds --scenarios digits-adamw,digits-adamw-noisy --terms 4 --out FILE
    python benchmarks/factored.py distortion            # inner-product error: Kronecker vs i.i.d.

Throughput: for each model size, structure and k, a fresh process (so that its peak resident
memory, VmHWM, is its own) builds a ``SourceAttributor`` with ``proj_structure`` "dense" or
"factored" at the same total k, sets a zero curvature (the features' cost does not depend on
its values) and times ``featurize_rows`` on the same sequences at one checkpoint (the fastest
of two calls; one call for dense at 10M+ parameters, which takes minutes): per-example
gradients plus the projection and the bookkeeping. Ratios are within one run of this script; the machine is
shared, so absolute numbers are noisy. GPT-2 shapes as in ``benchmarks/lm.py`` (byte
vocabulary, 64 tokens per sequence, eager attention, float32, CPU); 124M is GPT-2 small's
own shape (vocabulary 50257), factored only when the dense pass would not fit the default
4 GiB gradient budget at a useful batch.

Distortion: how well each projection keeps inner products of real per-example weight
gradients, (<P g, P g'> - <g, g'>) / (|g| |g'|) over all pairs of a set of examples (RMS, and
the largest of the squared-norm errors), for the library's dense Rademacher projection and the
Kronecker projection with 1 and 4 terms at the same k: rank-one gradients (the first layer of
the digits MLP) and gradients summed over 64 tokens (an MLP weight of the 10M GPT-2 shape).

LDS: the hidden-layer MLP scenarios of ``benchmarks/lds.py`` (digits, digits-noisy,
digits-two-stage, friedman, and the AdamW ones, where the factored weights take a rank-one
stand-in for Adam's D^{1/2}; ``--scenarios`` picks some), their ground truth from the same cache files
(``source_proj.evaluation``; computed if missing), several independently trained runs, each
projected densely and factored at the same k; SOURCE with the library's defaults on each.
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
from pathlib import Path

import numpy as np
import torch
from lm import gpt2, peak_rss  # the GPT-2 shapes and memory reading of the LM benchmark

ROOT = Path(__file__).resolve().parent
# n_embd, n_layer, n_head, vocabulary
SIZES = {"1M": (128, 4, 4, 256), "10M": (256, 12, 8, 256), "30M": (512, 9, 8, 256), "124M": (768, 12, 12, 50257)}
DIMS = (1024, 4096)
TOKENS, ROWS = 64, 16
REPEATS = 2  # featurize_rows calls per process (1 for dense at 10M+); the fastest counts
DENSE_SIZES = ("1M", "10M", "30M")


# ------------------------------------------------------------------ throughput
def measure(size: str, structure: str, dim: int, terms: int) -> dict:
    """One measurement in this process (one thread: on a shared machine, multi-threaded
    products stall on the slowest thread and their times vary several-fold)."""
    from source_proj.attributor import SourceAttributor
    from source_proj.curvature.spectra import SegmentSpectrum
    from source_proj.gradients.causal_lm import CausalLMTask
    from source_proj.gradients.data import as_examples
    from source_proj.trajectory.checkpoints import Checkpoint, Trajectory

    torch.set_num_threads(1)
    width, layers, heads, vocab = SIZES[size]
    model = gpt2(width, layers, heads, vocab, positions=TOKENS)
    p = sum(q.numel() for q in model.parameters())
    ids = torch.randint(0, vocab, (ROWS, TOKENS), generator=torch.Generator().manual_seed(0))
    data = {"input_ids": ids}
    traj = Trajectory((Checkpoint(model.state_dict(), steps=1, lr=0.1),))
    att = SourceAttributor(model, CausalLMTask(), traj, proj_dim=dim, num_segments=1, progress=False,
                           proj_structure=structure, kronecker_terms=terms, chunk_size=ROWS,
                           max_gradient_memory="16GiB")
    examples = as_examples(data)
    att.measure_projection(examples)  # the grouped projection's shares (nothing for the others)
    # The features' cost does not depend on the curvature's values: zero curvature (S = I,
    # phi = t I) spares the dense path a curvature pass through its whole matrix.
    k = att.proj_dim
    flat = [SegmentSpectrum(torch.zeros(k, dtype=torch.float64), torch.eye(k, dtype=torch.float64), seg.time)
            for seg in att.segments]
    att.set_curvature(flat, [1.0 / ROWS])
    times = []
    # A first call includes one-time work (the factored path's check against autograd); calls
    # of the dense path at 10M+ parameters take minutes, so one is timed there.
    for _ in range(1 if structure == "dense" and p > 5e6 else REPEATS):
        start = time.perf_counter()
        rows = att.featurize_rows(examples, 0, ROWS)
        times.append(time.perf_counter() - start)
        assert torch.isfinite(rows.features).all()
    seconds = min(times)
    return {"size": size, "structure": structure, "dim": dim, "terms": terms, "actual_dim": att.proj_dim,
            "params": p, "seconds": seconds, "peak_bytes": peak_rss(), "load": os.getloadavg()[0]}


def throughput(out: Path, sizes: list[str], terms: int) -> None:
    results = []
    for size in sizes:
        for dim in DIMS:
            structures = ("dense", "factored") if size in DENSE_SIZES else ("factored",)
            for structure in structures:
                cmd = [sys.executable, __file__, "_measure", size, structure, str(dim), str(terms)]
                line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
                results.append(json.loads(line))
                print(results[-1], flush=True)
    lines = [
        f"# Factored vs dense projection: LM featurisation throughput (CPU), {datetime.date.today()}",
        "",
        f"Machine: {platform.processor() or platform.machine()}, one thread of {len(os.sched_getaffinity(0))} cores "
        f"(1-minute load average {min(r.get('load', 0) for r in results):.1f}-{max(r.get('load', 0) for r in results):.1f} "
        f"at the end of the measurements), torch {torch.__version__}. GPT-2 shapes, {TOKENS} tokens per sequence, "
        f"{ROWS} sequences per batch, one checkpoint, float32; `featurize_rows` timed (fastest of {REPEATS} calls, one for dense at 10M+). "
        f"Factored: {terms} Kronecker term(s) per weight, the same total k as dense (the actual total is shown "
        "when rounding left some unused). Peak = VmHWM of a fresh process (model, Python and torch included).",
        "",
        "| model | params | k | structure | seq/s | tokens/s | speed-up vs dense | peak RSS |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    dense = {(r["size"], r["dim"]): r["seconds"] for r in results if r["structure"] == "dense"}
    for r in results:
        base = dense.get((r["size"], r["dim"]))
        ratio = f"{base / r['seconds']:.1f}x" if base and r["structure"] == "factored" else "-"
        k = f"{r['dim']}" + (f" ({r['actual_dim']})" if r["actual_dim"] != r["dim"] else "")
        lines.append(
            f"| {r['size']} | {r['params'] / 1e6:.1f}M | {k} | {r['structure']} | {ROWS / r['seconds']:.2f} | "
            f"{ROWS * TOKENS / r['seconds']:.0f} | {ratio} | {r['peak_bytes'] / 2**30:.2f} GiB |"
        )
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# ------------------------------------------------------------------ distortion
def _digits_gradients(n: int) -> torch.Tensor:
    """(n, 32, 64) per-example gradients of the first weight of a trained digits MLP (rank one)."""
    from source_proj.evaluation.scenarios import build, train_run
    from source_proj.gradients.model import ModelFunction
    from source_proj.gradients.per_example import loss_objective, per_example_gradients

    scenario = build("digits")
    model, trajectory = train_run(scenario, np.arange(scenario.num_train), 0)
    fn = ModelFunction.build(model, ["0.weight"])
    params, consts = fn.split_state(trajectory.checkpoints[-1].load(), torch.device("cpu"))
    x, y = torch.from_numpy(scenario.attributed.inputs[:n]), torch.from_numpy(scenario.attributed.targets[:n])
    grads = per_example_gradients(fn, params, consts, loss_objective(scenario.task().loss), x, y)
    return grads["0.weight"].reshape(n, 32, 64)


def _gpt2_gradients(n: int) -> torch.Tensor:
    """(n, 256, 1024) per-sequence gradients of layer 0's MLP input weight (Conv1D) of the 10M
    GPT-2 shape at initialisation, on random byte sequences of 64 tokens."""
    from source_proj.gradients.causal_lm import CausalLMTask
    from source_proj.gradients.model import ModelFunction
    from source_proj.gradients.per_example import loss_objective, per_example_gradients

    width, layers, heads, vocab = SIZES["10M"]
    model = gpt2(width, layers, heads, vocab, positions=TOKENS)
    name = "transformer.h.0.mlp.c_fc.weight"
    fn = ModelFunction.build(model, [name])
    params, consts = fn.split_state(fn.canonical_state(model.state_dict(), "init"), torch.device("cpu"))
    ids = torch.randint(0, vocab, (n, TOKENS), generator=torch.Generator().manual_seed(0))
    parts = []
    for start in range(0, n, 8):
        batch = {"input_ids": ids[start : start + 8]}
        grads = per_example_gradients(fn, params, consts, loss_objective(CausalLMTask().loss), batch, batch["input_ids"])
        parts.append(grads[name])
    return torch.cat(parts).reshape(n, width, 4 * width)


def _errors(exact: torch.Tensor, projected: torch.Tensor) -> tuple[float, float]:
    """(RMS over pairs i < j of the normalised inner-product error, largest squared-norm error)."""
    norms = exact.diagonal().sqrt()
    scaled = (projected - exact) / (norms[:, None] * norms[None, :])
    upper = torch.triu_indices(len(norms), len(norms), 1)
    return float(scaled[upper[0], upper[1]].square().mean().sqrt()), float(scaled.diagonal().abs().max())


def distortion(out: Path, seeds: int = 5) -> None:
    from source_proj.projection.jl import ProjectionConfig, project
    from source_proj.projection.kronecker import (
        Side,
        factor_matrix,
        project_formed,
        split_kronecker,
    )

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    cases = [("digits MLP, first weight (32 x 64), rank one", _digits_gradients(200), (256, 870)),
             ("GPT-2 10M shape, h.0.mlp.c_fc (256 x 1024), 64 tokens", _gpt2_gradients(48), (256, 1024, 4096))]
    lines = [
        f"# Inner-product distortion: Kronecker vs i.i.d. projection, {datetime.date.today()}",
        "",
        "Per-example weight gradients g, projections P to k coordinates; cells: RMS over pairs of "
        "(<Pg, Pg'> - <g, g'>) / (|g| |g'|), then (after /) the largest relative error of a squared norm, "
        f"mean over {seeds} seeds. Dense: the library's i.i.d. Rademacher projection. Kronecker: the factored "
        "projection's split of k (k_r x k_c <= k, identity sides where that is best), r terms. "
        "Theory for a rank-one g (Gaussian entries): std of the squared-norm error sqrt(2/k) i.i.d., "
        "sqrt(rank_one_variance) Kronecker.",
        "",
        "| gradients | k | dense (i.i.d.) | Kronecker, 1 term | Kronecker, 4 terms | sizes (1 term / 4 terms) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, grads, dims in cases:
        n, rows, cols = grads.shape
        flat = grads.reshape(n, -1).double()
        exact = flat @ flat.T
        for k in dims:
            cells, sizes = [], []
            for method in ("dense", 1, 4):
                results = []
                for seed in range(seeds):
                    if method == "dense":
                        p = project(grads.reshape(n, -1), ProjectionConfig(k, seed=seed)).double()
                    else:
                        k_r, k_c, r = split_kronecker(k, rows, cols, method)
                        a, b = (Side(factor_matrix(seed, "rademacher", 0, side, d, kd, r))
                                for side, d, kd in ((0, rows, k_r), (1, cols, k_c)))
                        p = torch.stack([project_formed(g, a, b, r) for g in grads]).double()
                    results.append(_errors(exact, p @ p.T))
                if method != "dense":
                    sizes.append(f"{k_r} x {k_c}" + (f" x {r}" if r > 1 else ""))
                rms, worst = np.mean(results, axis=0)
                cells.append(f"{rms:.4f} / {worst:.3f}")
            lines.append(f"| {label} | {k} | " + " | ".join(cells) + f" | {' / '.join(sizes)} |")
            print(lines[-1], flush=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# ------------------------------------------------------------------------- LDS
def lds(out: Path, quick: bool, runs: int, terms: tuple[int, ...], workers: int | None,
        names: tuple[str, ...] | None = None, grouped: bool = False) -> None:
    sys.path.insert(0, str(ROOT))
    from lds import (  # the LDS benchmark's own settings and helpers
        FULL,
        QUICK,
        RUN_SEED,
        _tensors,
    )

    from source_proj.config import SourceConfig
    from source_proj.evaluation import (
        LDSConfig,
        compute_ground_truth,
        linear_datamodeling_score,
    )
    from source_proj.evaluation.baselines import source_scores
    from source_proj.evaluation.projected_run import project_run
    from source_proj.evaluation.scenarios import (
        SCENARIOS,
        ScenarioRetrain,
        build,
        train_run,
    )

    settings = QUICK if quick else FULL
    k = settings.proj_dim
    torch.set_num_threads(1)
    started = time.time()
    rows: dict[str, dict[str, list[float]]] = {}
    intervals: dict[str, dict[str, str]] = {}
    # (structure, Kronecker terms, curvature_blocks): "auto" resolves by the model (MLPs: "full").
    variants = [("dense", 1, "auto"), *(("factored", t, "auto") for t in terms)]
    if grouped:
        variants += [("grouped", 1, "auto"), ("grouped", 1, "layer"), ("factored", terms[-1], "layer")]
    names = names or SCENARIOS
    for name in names:
        scenario = build(name)
        repeats = settings.repeats_for(name)
        truth = compute_ground_truth(
            ScenarioRetrain(scenario), scenario.num_train, LDSConfig(num_subsets=settings.num_subsets, repeats=repeats),
            cache_path=ROOT / "cache" / f"lds-{name}-M{settings.num_subsets}-R{repeats}.npz", workers=workers,
        )
        data = {s.label: _tensors(s.inputs, s.targets) for s in scenario.stages}
        queries = _tensors(scenario.query_inputs, scenario.query_targets)
        for seed in range(runs):
            model, trajectory = train_run(scenario, np.arange(scenario.num_train), RUN_SEED + seed)
            for structure, r, blocks in variants:
                label = (structure if structure != "factored" else f"factored, {r} term(s)") + (
                    ", layer blocks" if blocks == "layer" else "")
                run = project_run(model, scenario.task(), trajectory, data, scenario.attributed.label, queries, k,
                                  seed=seed, progress=False, curvature_modes=("exact",),
                                  structure=structure, kronecker_terms=r)
                scores = source_scores(run, SourceConfig(proj_dim=k, seed=seed, progress=False, proj_structure=structure,
                                                         kronecker_terms=r, curvature_blocks=blocks))
                result = linear_datamodeling_score(np.asarray(scores), truth, num_bootstrap=settings.bootstrap)
                rows.setdefault(label, {}).setdefault(name, []).append(result.score)
                if seed == 0:
                    intervals.setdefault(label, {})[name] = f"[{result.ci_low:.3f}, {result.ci_high:.3f}]"
            print(name, seed, {m: v[name][-1] for m, v in rows.items()}, flush=True)
    lines = [
        f"# LDS: {'factored and grouped' if grouped else 'factored'} vs dense projection "
        f"({'quick' if quick else 'full'}), {datetime.date.today()}",
        "",
        f"Scenarios and ground truth of `benchmarks/lds.py` (M = {settings.num_subsets} subsets, R as there), "
        f"k = {k}, SOURCE with the library's defaults (exact Gauss-Newton), {runs} independently trained runs "
        "per scenario, each projected every way with the same seed (`curvature_blocks` at its default, which is "
        "the whole Hessian for these MLPs, unless the row says layer blocks). Cells: mean LDS over the runs (run 0's 95% "
        "bootstrap interval); each difference row is that structure minus dense, mean and range over runs.",
        "",
        "| projection | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for label, per in rows.items():
        cells = [f"{np.mean(per[s]):.3f} {intervals[label][s]}" for s in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for label, per in rows.items():
        if label == "dense":
            continue
        diffs = {s: np.asarray(per[s]) - np.asarray(rows["dense"][s]) for s in names}
        cells = [f"{d.mean():+.3f} ({d.min():+.3f} .. {d.max():+.3f})" for d in diffs.values()]
        lines.append(f"| {label} - dense | " + " | ".join(cells) + " |")
    lines += ["", f"Total time {(time.time() - started) / 60:.1f} min."]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["throughput", "lds", "distortion", "_measure"])
    parser.add_argument("args", nargs="*")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", default=",".join(SIZES), help="model sizes of the throughput part")
    parser.add_argument("--terms", default=None, help="Kronecker terms (throughput: one value, default 4; lds: a "
                        "list, default 1,4)")
    parser.add_argument("--runs", type=int, default=3, help="trained runs per scenario (lds)")
    parser.add_argument("--workers", type=int, default=None, help="retraining processes for missing ground truth")
    parser.add_argument("--scenarios", default=None, help="lds: comma-separated scenarios (default all)")
    parser.add_argument("--grouped", action="store_true", help="lds: add proj_structure='grouped'")
    parser.add_argument("--out", type=Path, default=None, help="the table's file (default: results/factored-<part>...md)")
    args = parser.parse_args()
    results = ROOT / "results"
    terms = tuple(int(t) for t in (args.terms or ("4" if args.part == "throughput" else "1,4")).split(","))
    if args.part == "_measure":
        size, structure, dim, r = args.args
        print(json.dumps(measure(size, structure, int(dim), int(r))))
    elif args.part == "distortion":
        distortion(results / "factored-distortion.md")
    elif args.part == "throughput":
        throughput(args.out or results / f"factored-throughput-cpu-r{terms[0]}.md", args.sizes.split(","), terms[0])
    else:
        out = args.out or results / ("factored-lds-quick.md" if args.quick else "factored-lds.md")
        names = tuple(args.scenarios.split(",")) if args.scenarios else None
        lds(out, args.quick, 2 if args.quick else args.runs, terms, args.workers, names, args.grouped)


if __name__ == "__main__":
    main()
