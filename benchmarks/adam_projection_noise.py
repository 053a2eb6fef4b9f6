"""Does Adam's preconditioner help once projection noise is taken away?

    python benchmarks/adam_projection_noise.py     # writes results/adam-projection-noise.md

On the AdamW scenarios of ``lds.py`` ((e) ``digits-adamw``, (f) ``digits-adamw-noisy``; the same
ground truth, cached under benchmarks/cache/, and the same attributed run), this compares the
estimators with and without the preconditioner D at the benchmark's k = 1024, at k = 4096, and
without any projection (exact per-example gradients of the p = 2410 parameters, TracIn only:
without projection the k x k curvature would be p x p). The question it answers: is a gap
between the preconditioned and the unpreconditioned estimator at k = 1024 a property of the
estimator or of the random projection? The JL error of an inner product <Pa, Pb> has variance
(|a|^2 |b|^2 + (a.b)^2) / k, and rescaling by D^{1/2} makes gradients heavier-tailed (D spans
an order of magnitude across coordinates), which raises |a| |b| relative to a.b.

It also measures how much of that error comes from using one projection for every checkpoint:
TracIn at k = 1024 with the library's own dense matrix (``kernels.reference.matrix_block``)
under one seed for all checkpoints (the library's layout; it reproduces the projected run's
TracIn), a seed per SOURCE segment, and a seed per checkpoint. With one matrix, the errors of
similar gradients at neighbouring checkpoints are the same error again; independent matrices
let them average out, at the same k and the same storage per checkpoint or segment. The last
rows run ``SourceAttributor`` itself with one projection and with ``segment_projections=True``
(a matrix per segment).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from lds import FULL, described_as_sgd, source, train_and_project
from torch.func import functional_call, grad, vmap

from source_proj.attributor import SourceAttributor
from source_proj.config import SourceConfig
from source_proj.evaluation import (
    LDSConfig,
    compute_ground_truth,
    linear_datamodeling_score,
)
from source_proj.evaluation.baselines import tracin_scores
from source_proj.evaluation.scenarios import Scenario, ScenarioRetrain, build
from source_proj.kernels.reference import matrix_block
from source_proj.trajectory.checkpoints import Trajectory
from source_proj.trajectory.optimizer_state import Preconditioner

ROOT = Path(__file__).resolve().parent
SCENARIO_NAMES = ("digits-adamw", "digits-adamw-noisy")


def per_example_gradients(model: torch.nn.Module, state: dict, fn, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(n, p) float64 gradients of ``fn(model(x_i), y_i)`` in ``named_parameters`` order."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: state[n].detach() for n in names}

    def one(p, xi, yi):
        return fn(functional_call(model, p, (xi[None],)), yi[None]).sum()

    grads = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([grads[n].reshape(x.shape[0], -1) for n in names], 1).double()


def checkpoint_gradients(
    scenario: Scenario, trajectory: Trajectory, model: torch.nn.Module, preconditioned: bool
) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
    """Per checkpoint: (eta-sum / N, query gradients (n_query, p), training gradients (N, p)),
    both rescaled by D^{1/2} for a preconditioned run (float64, unprojected)."""
    task = scenario.task()
    stage = scenario.attributed
    x, y = torch.from_numpy(stage.inputs), torch.from_numpy(stage.targets)
    xq, yq = torch.from_numpy(scenario.query_inputs), torch.from_numpy(scenario.query_targets)
    names = [n for n, _ in model.named_parameters()]
    precond = Preconditioner.build(trajectory, model, names) if preconditioned else None
    out = []
    for c, ckpt in enumerate(trajectory.checkpoints):
        state = dict(ckpt.load())
        train = per_example_gradients(model, state, task.loss, x, y)
        query = per_example_gradients(model, state, task.measurement, xq, yq)
        if precond is not None:
            half = torch.cat(list(precond.sqrt_scale(c).values())).double()
            train, query = train * half, query * half
        out.append((ckpt.lr_sum() / x.shape[0], query, train))
    return out


def tracin(grads: list[tuple[float, torch.Tensor, torch.Tensor]], seeds: list[int] | None, k: int) -> torch.Tensor:
    """TracIn (n_query, N): -sum_c w_c (P_c q_c) . (P_c g_c), with P_c the library's dense
    Rademacher projection of seed ``seeds[c]`` to k dims, or no projection (``seeds`` None)."""
    total = 0.0
    for c, (weight, query, train) in enumerate(grads):
        if seeds is not None:
            proj = matrix_block(seeds[c], 0, query.shape[1], k, scaled=True).double()  # (p, k)
            query, train = query @ proj, train @ proj
        total = total - weight * query @ train.T
    return total


def attributor_scores(scenario: Scenario, model: torch.nn.Module, trajectory: Trajectory, **settings) -> torch.Tensor:
    """Scores (n_query, N) of ``SourceAttributor`` with the library's defaults but ``settings``."""
    stage = scenario.attributed
    att = SourceAttributor(model, scenario.task(), trajectory, proj_dim=FULL.proj_dim, seed=0, progress=False, **settings)
    att.fit((torch.from_numpy(stage.inputs), torch.from_numpy(stage.targets)))
    return att.score((torch.from_numpy(scenario.query_inputs), torch.from_numpy(scenario.query_targets)))


def d_spread(trajectory: Trajectory, model: torch.nn.Module) -> str:
    """Median and 90th percentile of D over coordinates, at the first and last checkpoint."""
    precond = Preconditioner.build(trajectory, model, [n for n, _ in model.named_parameters()])
    cells = []
    for c in (0, len(trajectory.checkpoints) - 1):
        d = torch.cat(list(precond.sqrt_scale(c).values())).double().square()
        cells.append(f"{d.median().item():.0f} / {torch.quantile(d, 0.9).item():.0f}")
    return " -> ".join(cells)


def evaluate(name: str, large_k: int, cache_dir: Path, bootstrap: int) -> tuple[list[list[str]], str]:
    """Table rows for one scenario, and the spread of D."""
    scenario = build(name)
    truth = compute_ground_truth(
        ScenarioRetrain(scenario),
        scenario.num_train,
        LDSConfig(num_subsets=FULL.num_subsets, repeats=FULL.repeats_for(name)),
        cache_path=cache_dir / f"lds-{name}-M{FULL.num_subsets}-R{FULL.repeats_for(name)}.npz",
    )

    def lds(scores) -> str:
        r = linear_datamodeling_score(np.asarray(scores), truth, num_bootstrap=bootstrap)
        return f"{r.score:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]"

    trained = train_and_project(scenario, 0, large_k)
    # The same run's checkpoints (the model is only their architecture), described both ways.
    model, trajectory = scenario.model(), trained.run.trajectory
    described = {True: trajectory, False: described_as_sgd(trajectory)}
    rows = []
    for k in (FULL.proj_dim, large_k):
        rows.append([f"SOURCE (defaults), k = {k}", lds(source(k)(trained)), lds(source(k, described_as_sgd=True)(trained))])
        rows.append([f"TracIn, k = {k}", lds(tracin_scores(trained.run.truncate(k))), lds(tracin_scores(trained.plain.truncate(k)))])
    grads = {d: checkpoint_gradients(scenario, described[d], model, d) for d in (True, False)}
    count = len(trajectory.checkpoints)
    segment_of = {c: s for s, seg in enumerate(trajectory.segments(SourceConfig().num_segments)) for c in seg.checkpoints}
    layouts = {
        "one seed for all checkpoints (the library's layout)": [0] * count,
        "a seed per segment (L = 3)": [segment_of[c] for c in range(count)],
        "a seed per checkpoint": list(range(count)),
    }
    k = FULL.proj_dim
    for label, seeds in layouts.items():
        rows.append([f"TracIn, k = {k}, {label}", *(lds(tracin(grads[d], seeds, k)) for d in (True, False))])
    rows.append(["TracIn, no projection (exact gradients)", *(lds(tracin(grads[d], None, k)) for d in (True, False))])
    for label, on in (("one projection (SourceAttributor, defaults)", False), ("a projection per segment", True)):
        rows.append([f"SOURCE, k = {k}, {label}",
                     *(lds(attributor_scores(scenario, model, described[d], segment_projections=on)) for d in (True, False))])
    return rows, d_spread(trajectory, model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large-k", type=int, default=4096, help="the larger projection dim")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "cache", help="ground-truth cache folder")
    parser.add_argument("--bootstrap", type=int, default=FULL.bootstrap)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "adam-projection-noise.md")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    lines = [
        "# Adam's preconditioner with and without projection noise",
        "",
        f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}. Single-model LDS (95% basic-bootstrap "
        f"interval over subsets) against the ground truth of `lds.py` (M = {FULL.num_subsets}); the attributed "
        "run is run 0 of `lds.py`. 'with D': the Adam trajectory; 'without D': the same checkpoints "
        "described as SGD (same per-step rates, no preconditioner).",
    ]
    for name in SCENARIO_NAMES:
        rows, spread = evaluate(name, args.large_k, args.cache_dir, args.bootstrap)
        lines += ["", f"## {name}", "", f"D over coordinates (median / 90th percentile), first -> last checkpoint: {spread}", ""]
        lines += ["| estimator | with D | without D |", "|---|---|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", f"Total: {time.perf_counter() - start:.0f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
