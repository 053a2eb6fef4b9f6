"""Why the earlier stage of a two-stage LM run is hard to attribute (issue #22): diagnostics.

    nice -n 10 python benchmarks/lm_stage_diagnostics.py                    # pretrain_finetune
    nice -n 10 python benchmarks/lm_stage_diagnostics.py --scenarios char_lm,pretrain_finetune

On ``lm_lds.py``'s scenarios and ground truths (M = 60 + 180 subsets, as ``lm_lds_seeds.py
--more-subsets 180`` makes them), four measurements:

1. Sensitivity of training to its initial point: the model's initial weights are perturbed by
   relative noise eps (each entry by eps * N(0, 1) * the tensor's mean |w|), the run is trained
   again with everything else equal, and the mean |change| of the query measurements is set
   beside the ground truth's between-subset spread and its retraining-seed noise. A change of
   the order of the seed noise from eps = 1e-7 means the run is chaotic: what a perturbation
   early in training does to the final model is scrambled.
2. Exact first-order influence by unrolled differentiation: the run is replayed as a
   differentiable AdamW (torch's update, step for step) with a weight w_m on each row's loss,
   and d measurement / d w_m is taken through every step (with Adam's second moment
   differentiated, and with it held fixed), then scored by LDS. In a chaotic run this exact
   derivative is dominated by directions that grow, and predicts nothing.
3. Calibration per stage: per query, the ground truth's mean measurements are regressed on the
   predicted effect of each stage's rows (sums of the scores over a subset's rows of that
   stage); an earlier stage's coefficient divided by the last stage's is 1 when its scores are
   as large, relative to the last stage's, as their effects, and 0 when they carry no signal.
   With the LDS of each stage's scores alone.
4. Curvature along the run: the eigenvalue of largest magnitude of the Adam-rescaled Hessian
   D^1/2 H D^1/2 of the training loss at each checkpoint (power iteration, 40 Hessian-vector
   products), times the learning rate: large negative values mark a phase where nearby
   trajectories separate.

SOURCE is ``SourceAttributor`` at the library's defaults (k = 1024, projection seed 0), EK-FAC
kronfluence's at its best damping on this ground truth (``lm_lds.kron_methods``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json

import lm_lds as bench
import lm_lds_seeds as seeds
import numpy as np
import torch

PERTURBATIONS = (1e-7, 1e-5, 1e-3)


def _measure(name: str, model: torch.nn.Module) -> np.ndarray:
    data = bench.scenario_data(name)
    inputs, targets = data.queries
    with torch.no_grad():
        return bench.task_for(data.kind).measurement(model(**inputs).logits, targets).numpy().astype(np.float64)


def _perturbed(tensors: dict[str, torch.Tensor], eps: float) -> None:
    """Add eps * N(0, 1) * mean |w| to every tensor in place (a fixed noise draw)."""
    noise = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for value in tensors.values():
            if value.is_floating_point():
                value.add_(eps * value.abs().mean() * torch.randn(value.shape, generator=noise))


def sensitivity(name: str) -> dict:
    """Mean |change| of the query measurements when the initial weights (the classifier's:
    its loaded body too) are perturbed by each relative size in ``PERTURBATIONS`` (one draw
    each), the run otherwise the same."""
    build, body = bench.build_model, bench.pretrained_body
    rows = np.arange(bench.scenario_data(name).num_train)
    changes = {}
    try:
        base = _measure(name, bench.train_scenario(name, rows, bench.FULL_SEED)[0])
        for eps in PERTURBATIONS:
            def perturbed_model(kind: str, seed: int, eps: float = eps) -> torch.nn.Module:
                model = build(kind, seed)
                _perturbed(dict(model.named_parameters()), eps)
                return model

            def perturbed_body(eps: float = eps) -> dict[str, torch.Tensor]:
                tensors = {k: v.clone() for k, v in body().items()}
                _perturbed(tensors, eps)
                return tensors

            bench.build_model, bench.pretrained_body = perturbed_model, perturbed_body
            changes[eps] = float(np.abs(_measure(name, bench.train_scenario(name, rows, bench.FULL_SEED)[0]) - base).mean())
    finally:
        bench.build_model, bench.pretrained_body = build, body
    return changes


def unrolled_scores(name: str, detach_second_moment: bool) -> tuple[np.ndarray, float]:
    """(n_query, N) d measurement / d row weight through the whole run, replayed as a
    differentiable AdamW, and the mean |difference| of its final measurements from the
    library-trained run's (float rounding, grown by the dynamics)."""
    from torch.func import functional_call

    data = bench.scenario_data(name)
    task = bench.task_for(data.kind)
    model = bench.build_model(data.kind, bench.FULL_SEED)
    if data.kind == "cls":
        model.load_state_dict(bench.pretrained_body(), strict=False)
    model.train()
    names = [n for n, _ in model.named_parameters()]
    theta = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    weights = torch.ones(data.num_train, requires_grad=True)
    offset = 0
    for stage in data.stages:
        settings = dataclasses.replace(stage.settings, seed=bench.FULL_SEED)
        n = len(stage.targets)
        order = torch.Generator().manual_seed(settings.seed)  # the batches of evaluation.training._train
        total = settings.epochs * -(-n // settings.batch_size)
        beta1, beta2 = settings.betas
        first = {k: torch.zeros_like(v) for k, v in theta.items()}
        second = {k: torch.zeros_like(v) for k, v in theta.items()}
        step = 0
        for _ in range(settings.epochs):
            perm = torch.randperm(n, generator=order)
            for start in range(0, n, settings.batch_size):
                rows = perm[start : start + settings.batch_size]
                logits = functional_call(model, {**theta, **buffers}, args=(), kwargs=bench.take(stage.inputs, rows)).logits
                loss = (task.loss(logits, stage.targets[rows]) * weights[offset + rows]).mean()
                grads = torch.autograd.grad(loss, [theta[k] for k in names], create_graph=True, allow_unused=True)
                lr = settings.lr * settings.rate_factor(step, total)
                step += 1
                updated = {}
                for k, g in zip(names, grads):
                    g = torch.zeros_like(theta[k]) if g is None else g
                    first[k] = beta1 * first[k] + (1 - beta1) * g
                    second[k] = beta2 * second[k] + (1 - beta2) * g * g
                    v = second[k].detach() if detach_second_moment else second[k]
                    # + 1e-30: sqrt's derivative at a zero second moment (a row never seen) is infinite
                    denom = (v / (1 - beta2**step) + 1e-30).sqrt() + settings.eps
                    decayed = theta[k] * (1 - lr * settings.weight_decay)
                    updated[k] = decayed - lr / (1 - beta1**step) * first[k] / denom
                theta = updated
        offset += n
    model.eval()
    inputs, targets = data.queries
    measured = task.measurement(functional_call(model, {**theta, **buffers}, args=(), kwargs=inputs).logits, targets)
    scores = np.stack([torch.autograd.grad(measured[q], weights, retain_graph=True)[0].numpy()
                       for q in range(len(targets))]).astype(np.float64)
    trained, _ = bench.train_scenario(name, np.arange(data.num_train), bench.FULL_SEED)
    return scores, float(np.abs(measured.detach().numpy() - _measure(name, trained)).mean())


def stage_calibration(scores: np.ndarray, truth, sizes: list[int]) -> dict:
    """Per stage: median over queries of the regression coefficient of the mean measurements on
    that stage's predicted effect (all stages' effects and an intercept in one regression),
    divided by the last stage's (methods' scores come in different units; what matters is
    whether an earlier stage's scores are as large, relative to the last stage's, as their
    effects), and the LDS of that stage's scores alone (the other stages' set to 0)."""
    from source_proj.evaluation import linear_datamodeling_score

    bounds = np.cumsum([0, *sizes])
    masks, actual = truth.masks.astype(np.float64), truth.mean
    effects = [masks[:, a:b] @ scores[:, a:b].T for a, b in zip(bounds[:-1], bounds[1:])]  # (M, Q) each
    coefficients = np.median([
        np.linalg.lstsq(np.column_stack([np.ones(len(masks)), *(e[:, q] for e in effects)]), actual[:, q], rcond=None)[0][1:]
        for q in range(actual.shape[1])
    ], axis=0)
    alone = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        kept = np.zeros_like(scores)
        kept[:, a:b] = scores[:, a:b]
        alone.append(linear_datamodeling_score(kept, truth, num_bootstrap=10).score)
    return {"relative_coefficient": (coefficients / coefficients[-1]).tolist(), "lds_alone": alone,
            "lds": linear_datamodeling_score(scores, truth, num_bootstrap=10).score}


def sharpness(name: str) -> list[tuple[str, float, float]]:
    """Per checkpoint: (stage, mean learning rate, eigenvalue of largest magnitude of D^1/2 H D^1/2
    of the stage's mean training loss), by power iteration."""
    from torch.func import functional_call, grad, jvp

    from source_proj.trajectory.optimizer_state import Preconditioner

    data = bench.scenario_data(name)
    task = bench.task_for(data.kind)
    model, trajectory = bench.train_scenario(name, np.arange(data.num_train), bench.FULL_SEED)
    names = [n for n, _ in model.named_parameters()]
    scale = Preconditioner.build(trajectory, model, names)
    stages = {s.label: s for s in data.stages}
    buffers = dict(model.named_buffers())
    out = []
    for index, checkpoint in enumerate(trajectory.checkpoints):
        stage = stages[checkpoint.stage]
        theta = {n: torch.as_tensor(checkpoint.state[n]).detach().float() for n in names}
        root = {n: v.reshape(theta[n].shape) for n, v in scale.sqrt_scale(index).items()}

        def loss(params, stage=stage):
            logits = functional_call(model, {**params, **buffers}, args=(), kwargs=stage.inputs).logits
            return task.loss(logits, stage.targets).mean()

        gradient = grad(loss)
        vector = {n: torch.randn(theta[n].shape, generator=torch.Generator().manual_seed(index)) for n in names}
        value = 0.0
        for _ in range(40):
            norm = sum(float((v**2).sum()) for v in vector.values()) ** 0.5
            vector = {n: v / norm for n, v in vector.items()}
            _, hv = jvp(gradient, (theta,), ({n: root[n] * vector[n] for n in names},))
            image = {n: root[n] * hv[n] for n in names}
            value = sum(float((image[n] * vector[n]).sum()) for n in names)
            vector = image
        lr = checkpoint.lr if isinstance(checkpoint.lr, float) else float(np.mean(checkpoint.lr))
        out.append((str(checkpoint.stage), lr, value))
    return out


def run_scenario(name: str) -> dict:
    from source_proj.evaluation import linear_datamodeling_score

    torch.set_num_threads(1)
    data = bench.scenario_data(name)
    truth = seeds.ground_truth(name, (180,))
    noise = truth.measurements.std(axis=1, ddof=1).mean()
    model, trajectory = bench.train_scenario(name, np.arange(data.num_train), bench.FULL_SEED)
    kron = bench.kron_methods(model, data)
    methods = {"SOURCE defaults (seed 0)": bench.source_scores(model, trajectory, data, {}).double().numpy()}
    if kron:
        best = max(kron, key=lambda label: linear_datamodeling_score(kron[label][0], truth).score)
        methods[f"best EK-FAC ({best.removeprefix('kronfluence EK-FAC, ')})"] = kron[best][0]
    unrolled = {}
    for detach in (False, True):
        label = "exact unrolled derivative" + (" (Adam's second moment held fixed)" if detach else "")
        methods[label], unrolled[label] = unrolled_scores(name, detach)
    sizes = [len(s.targets) for s in data.stages]
    return {
        "scenario": name, "subsets": int(truth.masks.shape[0]), "stages": [s.label for s in data.stages],
        "spread": float(truth.mean.std(axis=0).mean()), "seed_noise": float(noise),
        "sensitivity": {str(k): v for k, v in sensitivity(name).items()}, "replay_difference": max(unrolled.values()),
        "calibration": {label: stage_calibration(scores, truth, sizes) for label, scores in methods.items()},
        "sharpness": sharpness(name), "machine": bench.machine(),
    }


def write_report(results: list[dict], out) -> None:
    lines = [f"# LM benchmark: why an earlier stage is hard to attribute, {datetime.date.today()}", "",
             f"Machine: {'; '.join(dict.fromkeys(r['machine'] for r in results))}; torch {torch.__version__}, "
             "1 thread. How it is made and what each table means: `benchmarks/lm_stage_diagnostics.py`.", ""]
    for r in results:
        lines += [f"## {r['scenario']} (ground truth M = {r['subsets']} x R = 3)", "",
                  f"Query measurements: spread between subsets (std of the mean over retrainings) {r['spread']:.3f}; "
                  f"retraining-seed noise (std over the 3 seeds) {r['seed_noise']:.3f}.", "",
                  "| initial weights perturbed by (relative) | mean abs change of the query measurements |",
                  "| --- | --- |"]
        lines += [f"| {eps} | {change:.3f} |" for eps, change in r["sensitivity"].items()]
        lines += ["", "Replayed as a differentiable AdamW (the same updates, computed in another order), the final "
                  f"measurements differ from the trained run's by {r['replay_difference']:.3f} (mean abs): float "
                  "rounding, grown by the dynamics.", ""]
        stages = r["stages"]
        earlier = stages[:-1]
        lines += ["| method | LDS | " + " | ".join(f"LDS of {s} rows alone" for s in stages)
                  + "".join(f" | coefficient of {s} rows / of {stages[-1]} rows" for s in earlier) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in stages) + " | ---" * len(earlier) + " |"]
        for label, c in r["calibration"].items():
            cells = " | ".join(f"{a:.3f}" for a in c["lds_alone"])
            ratios = "".join(f" | {b:.3f}" for b in c["relative_coefficient"][:-1])
            lines.append(f"| {label} | {c['lds']:.3f} | {cells}{ratios} |")
        lines += ["", "| checkpoint | stage | learning rate | largest-magnitude eigenvalue of D^1/2 H D^1/2 | x learning rate |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {i} | {stage} | {lr:.3g} | {value:.4g} | {value * lr:.3g} |"
                  for i, (stage, lr, value) in enumerate(r["sharpness"])]
        lines.append("")
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default="pretrain_finetune")
    args = parser.parse_args()
    results = [run_scenario(name) for name in args.scenarios.split(",")]
    (bench.CACHE / "lm-stage-diagnostics.json").write_text(json.dumps(results))
    write_report(results, bench.ROOT / "results" / f"lm-stage-diagnostics-{datetime.date.today()}.md")


if __name__ == "__main__":
    main()
