"""Ablations of SOURCE on the LM attribution benchmark's scenarios (issue #22's directions).

    nice -n 10 python benchmarks/lm_lds_ablations.py               # every scenario
    nice -n 10 python benchmarks/lm_lds_ablations.py --scenarios classify

Reuses ``lm_lds.py``'s scenarios, its cached ground truths (M = 60 x R = 3) and its cached
score matrices of SOURCE at the defaults and of kronfluence's EK-FAC (run ``lm_lds.py`` first),
and scores SOURCE variants against them, each with paired bootstrap differences to the best
EK-FAC damping and to SOURCE at its defaults. Variants:

* time scale x0.5 / x0.25, L = 2 segments per stage (the library's settings);
* the factored projection with the whole Hessian, and block-diagonal over its layers
  (``curvature_blocks``, the library's setting) at k = 1024 and 4096; and block-diagonal per
  factored weight (the dense remainder one more block), obtained by zeroing the other entries
  of each segment's Hessian before the library's eigendecomposition (a measurement device:
  the same matrix functions a per-block eigendecomposition gives);
* the run described as plain SGD (no Adam preconditioner), dense and factored: separates the
  factored projection's own error from its interaction with Adam's rescaling;
* the dense projection with Adam's D^{1/2} replaced, on the weights the factored projection
  factors, by the rank-one stand-in it uses (``rank_one_fit``): is that stand-in the cost?
* a *grouped* dense projection: the parameters split by layer (a name's prefix up to its first
  numbered part, e.g. ``transformer.h.0``; other parameters by their module, e.g.
  ``transformer.wte``), each group projected by its own i.i.d. matrix to k_g coordinates with
  sum k_g = k, shared in proportion to the groups' parameter counts (as the factored projection
  shares k) or to their gradient energy: the root mean square norm of the D^{1/2}-rescaled
  per-example loss gradients of at most 64 rows of the last stage at the final checkpoint (the
  allocation that minimises the summed JL variance of inner products, sum_g |u_g| |v_g| / k_g);
  with the whole Hessian or with one block per group. A device: the library's ``project`` is
  replaced within the fit (training rows, queries and curvature factors alike) and the
  attributor's ``curvature_groups`` set by hand.

Ablation devices patch library internals inside this process only (documented per variant).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import time
from collections.abc import Iterator
from pathlib import Path

import lm_lds as bench
import numpy as np
import torch

VARIANTS: dict[str, dict] = {
    "time_scale 0.5": {"time_scale": 0.5},
    "time_scale 0.25": {"time_scale": 0.25},
    "num_segments 2": {"num_segments": 2},
    "factored, whole Hessian": {"proj_structure": "factored", "curvature_blocks": "full"},
    "factored, block-diagonal curvature per weight": {"proj_structure": "factored", "curvature_blocks": "full",
                                                      "_weight_blocks": True},
    "factored, block-diagonal curvature per layer": {"proj_structure": "factored", "curvature_blocks": "layer"},
    "factored k=4096, block-diagonal curvature per layer": {"proj_structure": "factored", "proj_dim": 4096},
    "dense, run described as SGD (no preconditioner)": {"_sgd": True},
    "factored, run described as SGD (no preconditioner)": {"proj_structure": "factored", "curvature_blocks": "full",
                                                           "_sgd": True},
    "dense, Adam's D^1/2 rank-one on factorable weights": {"_rank_one_scale": True},
    "grouped dense, k shared by parameter count, whole Hessian": {"_grouped": "numel", "_layer_blocks": False},
    "grouped dense, k shared by parameter count, layer blocks": {"_grouped": "numel", "_layer_blocks": True},
    "grouped dense, k shared by gradient energy, whole Hessian": {"_grouped": "energy", "_layer_blocks": False},
    "grouped dense, k shared by gradient energy, layer blocks": {"_grouped": "energy", "_layer_blocks": True},
    "dense (the defaults), projection seed 1": {"seed": 1},
    "grouped dense, k shared by gradient energy, layer blocks, projection seed 1": {
        "_grouped": "energy", "_layer_blocks": True, "seed": 1},
}


def weight_spans(plan) -> list[tuple[int, int]]:
    """Column spans [start, stop) of the factored projection's weights, and of its dense
    remainder."""
    spans, start = [], 0
    for block in plan.blocks:
        spans.append((start, start + block.dim))
        start += block.dim
    if plan.rest_dim:
        spans.append((start, start + plan.rest_dim))
    return spans


@contextlib.contextmanager
def block_diagonal(spans: list[tuple[int, int]] | None) -> Iterator[None]:
    """Within the block, every segment's mean Hessian keeps only the ``spans`` diagonal blocks."""
    import source_proj.curvature.spectra as spectra

    original = spectra.segment_spectrum
    if spans is None:
        yield
        return

    def restricted(hessians, weight_decay, time, groups=None):
        k = hessians[0].shape[0]
        keep = torch.zeros(k, k, dtype=torch.bool)
        for low, high in spans:
            keep[low:high, low:high] = True
        zero = torch.zeros((), dtype=torch.float64)
        return original([torch.where(keep, h.to(torch.float64), zero) for h in hessians], weight_decay, time, groups)

    spectra.segment_spectrum = restricted
    try:
        yield
    finally:
        spectra.segment_spectrum = original


def rank_one_scales(attributor, plan) -> None:
    """Replace the attributor's D^{1/2} on the factored weights of ``plan`` by their rank-one
    stand-ins (the factored projection's ``rank_one_fit``, with its weights)."""
    from source_proj.projection.kronecker import rank_one_fit

    blocks = {b.name: b for b in plan.blocks}
    exact = attributor.preconditioner.sqrt_scale

    def approximate(index, device="cpu"):
        out = {}
        for name, root in exact(index, device).items():
            if name in blocks:
                square = root.reshape(blocks[name].rows, blocks[name].cols)
                a, b = rank_one_fit(square, square.double().pow(-4))
                root = torch.outer(a, b).reshape(-1).to(root)
            out[name] = root
        return out

    object.__setattr__(attributor.preconditioner, "sqrt_scale", approximate)  # a frozen dataclass


def layer_key(name: str) -> str:
    """A parameter's group in the grouped projection: its name up to the first numbered part,
    else its module's name."""
    parts = name.split(".")
    cut = next((i + 1 for i, part in enumerate(parts) if part.isdigit()), None)
    return ".".join(parts[:cut] if cut else parts[:-1]) or name


def group_energy(attributor, data, members: dict[str, list[str]]) -> list[float]:
    """Per group, the root mean square norm of the D^{1/2}-rescaled per-example loss gradients
    of at most 64 rows of the last stage at the final checkpoint."""
    from source_proj.gradients.per_example import loss_objective, per_example_gradients

    final = len(attributor.trajectory.checkpoints) - 1
    stage = data.stages[-1]
    rows = torch.arange(min(64, len(stage.targets)))
    with attributor.reading_pass():
        params, consts = attributor._load(final)
        grads = per_example_gradients(attributor.model_fn, params, consts, loss_objective(attributor.task.loss),
                                      bench.take(stage.inputs, rows), stage.targets[rows])
        scale = attributor.gradient_scale(final)
    energy = []
    for names in members.values():
        total = 0.0
        for name in names:
            block = grads[name].reshape(len(rows), -1).double()
            if scale is not None:
                block = block * scale[name].double()
            total += float(block.pow(2).sum(1).mean())
        energy.append(total ** 0.5)
    return energy


@contextlib.contextmanager
def grouped_projection(attributor, data, share_by: str, layer_blocks: bool) -> Iterator[None]:
    """Within the block, ``attributor`` projects each parameter group with its own i.i.d.
    matrix (module docstring), and restricts the Hessians to the groups' blocks if asked."""
    import source_proj.projection.projected as projected
    from source_proj.projection.jl import ProjectionConfig
    from source_proj.projection.kronecker import share_budget

    names = list(attributor.model_fn.names)
    members: dict[str, list[str]] = {}
    for name in names:
        members.setdefault(layer_key(name), []).append(name)
    numel = {n: p.numel() for n, p in attributor.model_fn.model.named_parameters()}
    sizes = [float(sum(numel[n] for n in group)) for group in members.values()]
    weights = group_energy(attributor, data, members) if share_by == "energy" else sizes
    k = attributor.proj_dim
    shares = share_budget([max(1, round(w / max(weights) * 1e9)) for w in weights], k)
    shares[max(range(len(shares)), key=weights.__getitem__)] += k - sum(shares)
    config = attributor.projection
    original = projected.project

    def project(grads, settings, row_offset=0):
        if not isinstance(grads, dict):
            return original(grads, settings, row_offset)
        return torch.cat([
            original([grads[n] for n in group], ProjectionConfig(share, config.seed + 1 + g, config.kind))
            for g, (group, share) in enumerate(zip(members.values(), shares))
        ], dim=1)

    projected.project = project
    if layer_blocks:
        attributor.curvature_groups = torch.cat(
            [torch.full((share,), g, dtype=torch.int64) for g, share in enumerate(shares)])
    try:
        yield
    finally:
        projected.project = original
        attributor.curvature_groups = None


def variant_scores(model, trajectory, data, spec: dict) -> torch.Tensor:
    """SOURCE scores (n_query, N) of one variant (``lm_lds.source_scores`` with the devices)."""
    from source_proj.attributor import SourceAttributor
    from source_proj.config import SourceConfig

    settings = {k: v for k, v in spec.items() if not k.startswith("_")}
    if spec.get("_sgd"):
        trajectory = dataclasses.replace(trajectory, optimizer="sgd", checkpoints=tuple(
            dataclasses.replace(c, optimizer_state=None) for c in trajectory.checkpoints))
    task = bench.task_for(data.kind)
    attributor = SourceAttributor(model, task, trajectory, SourceConfig(progress=False, **settings))
    plan = None
    if spec.get("_weight_blocks") or spec.get("_rank_one_scale"):
        factored = SourceAttributor(model, task, trajectory, SourceConfig(progress=False, proj_structure="factored"))
        plan = factored.projection.plan
    if spec.get("_rank_one_scale"):
        rank_one_scales(attributor, plan)
    curvature = {s.label: (s.inputs, s.targets) for s in data.stages} if len(data.stages) > 1 else None
    parts = []
    grouped = (grouped_projection(attributor, data, spec["_grouped"], spec["_layer_blocks"]) if "_grouped" in spec
               else contextlib.nullcontext())
    with grouped, block_diagonal(weight_spans(plan) if spec.get("_weight_blocks") else None):
        for stage in data.stages:
            attributor.fit((stage.inputs, stage.targets), stages=(stage.label,), curvature_data=curvature)
            parts.append(attributor.score(data.queries))
    return torch.cat(parts, dim=1)


def run_scenario(name: str) -> dict:
    """Each variant's LDS and paired differences on scenario ``name``."""
    from source_proj.evaluation import LDSConfig, compute_ground_truth, linear_datamodeling_score

    torch.set_num_threads(1)
    data = bench.scenario_data(name)
    config = LDSConfig(num_subsets=60, repeats=3)
    cache = bench.CACHE / f"lm-lds-{name}-{config.num_subsets}x{config.repeats}.npz"
    scores_file = bench.CACHE / f"lm-lds-scores-{name}-full.npz"
    if not (cache.is_file() and scores_file.is_file()):
        raise SystemExit(f"run benchmarks/lm_lds.py --scenarios {name} first (needs {cache.name}, {scores_file.name})")
    truth = compute_ground_truth(bench.Retrain(name), data.num_train, config, workers=1, progress=False,
                                 cache_path=cache, setup_key=f"lm-lds-v1-{name}")
    model, trajectory = bench.train_scenario(name, np.arange(data.num_train), bench.FULL_SEED)
    with np.load(scores_file) as saved:
        labels = json.loads(str(saved["labels"]))
        cached = {label: saved[f"s{i}"] for i, label in enumerate(labels)}
    kron = [label for label in cached if label.startswith("kronfluence")]
    best = max(kron, key=lambda label: linear_datamodeling_score(cached[label], truth).score)
    default = next(label for label in cached if label.startswith("SOURCE defaults"))
    rows = []
    for label, scores in [(best, cached[best]), (default, cached[default])]:
        result = linear_datamodeling_score(scores, truth)
        rows.append({"method": label + " (cached)", "lds": result.score, "low": result.ci_low, "high": result.ci_high,
                     "gaps": [bench.paired_difference(scores, cached[ref], truth) for ref in (best, default)],
                     "seconds": float("nan")})
    for label, spec in VARIANTS.items():
        start = time.perf_counter()
        scores = np.asarray(variant_scores(model, trajectory, data, spec), dtype=np.float64)
        seconds = time.perf_counter() - start
        result = linear_datamodeling_score(scores, truth)
        rows.append({"method": label, "lds": result.score, "low": result.ci_low, "high": result.ci_high,
                     "gaps": [bench.paired_difference(scores, cached[ref], truth) for ref in (best, default)],
                     "seconds": seconds})
        print(f"{name}: {label}: {result} ({seconds:.1f} s)", flush=True)
    return {"scenario": name, "rows": rows, "references": [best, default], "machine": bench.machine()}


def write_report(results: list[dict], out: Path) -> None:
    """The markdown table of every scenario's variants."""
    lines = [
        f"# LM benchmark ablations (issue #22's directions), {datetime.date.today()}",
        "",
        f"Machine: {'; '.join(dict.fromkeys(r['machine'] for r in results))}; torch {torch.__version__}, "
        "1 thread, `nice -n 10`, shared machine (times are noisy). Scenarios, ground truths (M = 60 x R = 3) "
        "and the cached SOURCE-defaults and EK-FAC scores are those of `lm_lds.py` "
        "(results/lm-lds-2026-12-06.md, which has their times); k = 1024 unless stated. How each variant is made: "
        "`benchmarks/lm_lds_ablations.py`'s docstring.",
        "",
    ]
    for r in results:
        lines += [f"## {r['scenario']}", "",
                  "| variant | LDS | 95% CI | minus best EK-FAC [paired 95% CI] | minus SOURCE defaults [paired 95% CI] "
                  "| fit+score (s) |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {row['method']} | {row['lds']:.3f} | [{row['low']:.3f}, {row['high']:.3f}] | "
                  + " | ".join(f"{g[0]:+.3f} [{g[1]:+.3f}, {g[2]:+.3f}]" for g in row["gaps"])
                  + (" | - |" if np.isnan(row["seconds"]) else f" | {row['seconds']:.1f} |") for row in r["rows"]]
        lines += ["", f"Best EK-FAC: {r['references'][0]}.", ""]
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default=",".join(bench.SCENARIOS))
    args = parser.parse_args()
    for name in args.scenarios.split(","):
        (bench.CACHE / f"lm-lds-ablations-{name}.json").write_text(json.dumps(run_scenario(name)))
    results = [json.loads(p.read_text()) for name in bench.SCENARIOS
               if (p := bench.CACHE / f"lm-lds-ablations-{name}.json").is_file()]
    write_report(results, bench.ROOT / "results" / f"lm-lds-ablations-{datetime.date.today()}.md")


if __name__ == "__main__":
    main()
