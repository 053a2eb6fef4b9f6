"""LDS and subset-removal benchmark: SOURCE against baselines on scikit-learn data.

    python benchmarks/lds.py            # full run (M = 100 subsets), writes results/lds-full.md
    python benchmarks/lds.py --quick    # smoke run, writes results/lds-quick.md

Scenarios (``source_proj.evaluation.scenarios``): (a) digits to convergence, (b) 30% noisy
labels and 3 epochs, (c) two-stage training with rotated digits in stage 2 (attributing
stage-1 rows), (d) friedman1 regression with absolute error. For each, the LDS ground truth
(cached under benchmarks/cache/) is computed once; several independently trained runs are
projected once (``project_run``) and every estimator is evaluated on those same projected
gradients and Hessians: single-model (run 0) and ensembles (mean over runs). TRAK's own
package (``traker``, CPU BasicProjector) runs on (a) as an external reference when installed.
Ablations of SOURCE's settings and the counterfactual curves for (a) and (b) follow.

AdamW scenarios (e) ``digits-adamw`` (warm-up + cosine, to convergence) and (f)
``digits-adamw-noisy`` (30% noisy labels, 3 epochs) compare preconditioned SOURCE (both query
forms, a time-scale sweep, with and without a beta1 time factor 1 / (1 - beta1)) with the
same checkpoints described as SGD (what the library offered before Adam support: no
preconditioner, the same per-step learning rates), TracIn with and without the Adam
preconditioner, influence functions and TRAK (both unpreconditioned, as they are used).

    python benchmarks/lds.py --scenarios digits-adamw,digits-adamw-noisy --out results/lds-adamw.md
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from source_proj.config import SourceConfig
from source_proj.evaluation import (
    CounterfactualConfig,
    LDSConfig,
    LDSResult,
    compute_ground_truth,
    linear_datamodeling_score,
    subset_removal,
)
from source_proj.evaluation.baselines import (
    ensemble,
    influence_scores,
    penultimate_features,
    representation_similarity,
    source_scores,
    tracin_scores,
    trak_scores,
)
from source_proj.evaluation.ground_truth import LDSGroundTruth
from source_proj.evaluation.projected_run import ProjectedRun, project_run
from source_proj.evaluation.scenarios import (
    SCENARIOS,
    Scenario,
    ScenarioRetrain,
    build,
    train_run,
)
from source_proj.trajectory.checkpoints import Trajectory

ROOT = Path(__file__).resolve().parent
RUN_SEED = 10_000  # training seeds of the attributed runs (disjoint from the LDS seeds)
COUNTERFACTUAL_SCENARIOS = ("digits", "digits-noisy")


@dataclass(frozen=True)
class BenchSettings:
    """Sizes of one benchmark run.

    Attributes:
        num_subsets: M of the LDS ground truth (fraction 0.5).
        repeats: R, retrainings per subset; ``extra_repeats`` overrides it per scenario
            (the noisier ones get more).
        ensemble_runs: independently trained runs averaged by the ensembles.
        proj_dim: k of the main table (every method; the library's default).
        ablation_dims: projection dims of the ablation (the runs are projected to the max).
        segment_counts: L values of the ablation.
        time_scales: multipliers of t = eta K / (1 - beta) in the ablation.
        dampings: relative damping values of influence functions.
        sgd_time_scales: multipliers of t in the sweep of the SGD description of Adam runs
            (Adam's steps are D times larger than the learning rate says, so large ones).
        cf_ks, cf_queries, cf_seeds: counterfactual removal sizes, queries, seeds.
        bootstrap: bootstrap replicates of each LDS interval.
    """

    num_subsets: int = 100
    repeats: int = 8
    extra_repeats: tuple[tuple[str, int], ...] = (("digits-two-stage", 16), ("friedman", 16), ("digits-adamw-noisy", 16))
    ensemble_runs: int = 3
    proj_dim: int = 1024
    ablation_dims: tuple[int, ...] = (128, 256, 512, 1024)
    segment_counts: tuple[int, ...] = (1, 2, 3, 5)
    time_scales: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0)
    dampings: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
    sgd_time_scales: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0)
    cf_ks: tuple[int, ...] = (8, 16, 32)
    cf_queries: int = 30
    cf_seeds: int = 2
    bootstrap: int = 1000

    @property
    def max_dim(self) -> int:
        return max((self.proj_dim, *self.ablation_dims))

    def repeats_for(self, scenario: str) -> int:
        """R for ``scenario``."""
        return dict(self.extra_repeats).get(scenario, self.repeats)


FULL = BenchSettings()
QUICK = BenchSettings(
    num_subsets=12,
    repeats=2,
    extra_repeats=(),
    ensemble_runs=2,
    proj_dim=64,
    ablation_dims=(32, 64),
    segment_counts=(1, 3),
    time_scales=(1.0,),
    dampings=(1e-3, 1.0),
    sgd_time_scales=(1.0, 100.0),
    cf_ks=(16,),
    cf_queries=4,
    cf_seeds=1,
    bootstrap=100,
)

# The paper's form of SOURCE: query gradient at the final checkpoint transported through the
# later segments, t = eta K / (1 - beta), three segments per stage, exact Gauss-Newton.
PAPER_FORM = {"query_mode": "final", "momentum_factor": True, "time_scale": 1.0, "num_segments": 3, "curvature": "exact"}
SEGMENT_FORM = {**PAPER_FORM, "query_mode": "segment"}
_ESTIMATOR_FIELDS = tuple(PAPER_FORM)


@dataclass(frozen=True)
class Trained:
    """One attributed run: its projected quantities, final state and penultimate features.

    For an Adam run, ``run`` is in the preconditioned coordinates and ``sgd`` holds the same
    checkpoints described as SGD (unpreconditioned gradients and Hessians); None otherwise.
    """

    run: ProjectedRun
    final_state: dict
    train_repr: torch.Tensor
    query_repr: torch.Tensor
    sgd: ProjectedRun | None = None

    @property
    def plain(self) -> ProjectedRun:
        """The unpreconditioned run (what IF and TRAK use)."""
        return self.run if self.sgd is None else self.sgd


Method = Callable[[Trained], torch.Tensor]


@dataclass
class ScenarioReport:
    """Everything measured on one scenario (filled in as the benchmark goes)."""

    name: str
    truth: LDSGroundTruth
    main: dict[str, tuple[LDSResult, LDSResult | None]] = field(default_factory=dict)
    ablations: dict[str, LDSResult] = field(default_factory=dict)
    counterfactual: dict[str, np.ndarray] = field(default_factory=dict)
    cf_queries: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    preconditioned: bool = False


def source(k: int, described_as_sgd: bool = False, **settings) -> Method:
    """SOURCE with the library's defaults except ``settings``, at projection dim ``k`` (on the
    SGD description of an Adam run with ``described_as_sgd``)."""

    def scores(t: Trained) -> torch.Tensor:
        run = t.sgd if described_as_sgd else t.run
        return source_scores(run, SourceConfig(proj_dim=k, seed=run.seed, progress=False, **settings))

    return scores


def _is_default(settings: dict) -> bool:
    default = SourceConfig()
    return all(settings.get(f, getattr(default, f)) == getattr(default, f) for f in _ESTIMATOR_FIELDS)


def source_variants(preconditioned: bool = False) -> dict[str, dict]:
    """The SOURCE rows of the main table; the one equal to the library's defaults says so."""
    if preconditioned:
        variants = {
            "SOURCE preconditioned, paper form (final query)": PAPER_FORM,
            "SOURCE preconditioned, query per segment": SEGMENT_FORM,
        }
    else:
        variants = {
            "SOURCE L=1 (paper form)": {**PAPER_FORM, "num_segments": 1},
            "SOURCE L=3 (paper form)": PAPER_FORM,
            "SOURCE L=3, query per segment": SEGMENT_FORM,
        }
    named = {f"{name} = defaults" if _is_default(cfg) else name: cfg for name, cfg in variants.items()}
    if not any(_is_default(cfg) for cfg in variants.values()):
        named["SOURCE (library defaults)"] = {}
    return named


def main_methods(k: int) -> dict[str, Method]:
    """The main table's estimators, all at projection dim ``k``."""
    methods: dict[str, Method] = {
        "RepSim": lambda t: representation_similarity(t.query_repr, t.train_repr),
        "TracIn": lambda t: tracin_scores(t.run.truncate(k)),
        "IF (damping 1e-3)": lambda t: influence_scores(t.run.truncate(k), 1e-3),
        "TRAK": lambda t: trak_scores(t.run.truncate(k)),
    }
    for name, settings in source_variants().items():
        methods[name] = source(k, **settings)
    return methods


def adam_main_methods(k: int) -> dict[str, Method]:
    """The main table of an Adam scenario, all at projection dim ``k``: preconditioned SOURCE,
    the SGD description of the run, TracIn with and without the preconditioner, IF and TRAK."""
    methods: dict[str, Method] = {
        "RepSim": lambda t: representation_similarity(t.query_repr, t.train_repr),
        "TracIn (Adam preconditioner)": lambda t: tracin_scores(t.run.truncate(k)),
        "TracIn (no preconditioner)": lambda t: tracin_scores(t.plain.truncate(k)),
        "IF (damping 1e-3)": lambda t: influence_scores(t.plain.truncate(k), 1e-3),
        "TRAK": lambda t: trak_scores(t.plain.truncate(k)),
    }
    for name, settings in source_variants(preconditioned=True).items():
        methods[name] = source(k, **settings)
    methods[SGD_DESCRIPTION] = source(k, described_as_sgd=True)
    methods["SGD description: SOURCE paper form"] = source(k, described_as_sgd=True, **PAPER_FORM)
    return methods


# The Adam run described as SGD with the library's defaults: what users could do before.
SGD_DESCRIPTION = "SGD description of the run: SOURCE (library defaults for SGD)"


def ablation_methods(settings: BenchSettings, adam: bool = False) -> dict[str, Method]:
    """SOURCE settings varied one at a time from the paper form and from the per-segment form;
    projection dims of SOURCE (defaults) and TRAK; the damping of influence functions. For
    Adam runs (``adam``): preconditioned SOURCE's settings (the beta1 time factor 1 / (1 -
    beta1) is the time scale 1 / (1 - 0.9) = 10) and the SGD description's time scale, with
    TRAK and influence functions on the unpreconditioned run."""
    k = settings.proj_dim
    name = "SOURCE preconditioned" if adam else "SOURCE"
    baseline = (lambda t: t.plain) if adam else (lambda t: t.run)  # what TRAK and IF project
    methods: dict[str, Method] = {}
    for label, form in (("final query", PAPER_FORM), ("query per segment", SEGMENT_FORM)):
        for L in settings.segment_counts:
            methods[f"{name} {label}, L={L}"] = source(k, **{**form, "num_segments": L})
        for scale in settings.time_scales:
            methods[f"{name} {label}, t x {scale:g}"] = source(k, **{**form, "time_scale": scale})
        if adam:
            methods[f"{name} {label}, beta1 time factor (t x 1/(1 - beta1))"] = lambda t, form=form: source(
                k, **{**form, "time_scale": 1.0 / (1.0 - t.run.trajectory.betas[0])}
            )(t)
            for scale in settings.sgd_time_scales:
                methods[f"SGD description {label}, t x {scale:g}"] = source(k, described_as_sgd=True,
                                                                            **{**form, "time_scale": scale})
        else:
            methods[f"{name} {label}, no momentum factor"] = source(k, **{**form, "momentum_factor": False})
            methods[f"{name} {label}, sampled GN"] = source(k, **{**form, "curvature": "sampled"})
    for dim in settings.ablation_dims:
        methods[f"SOURCE (defaults) k={dim}"] = source(dim)
        methods[f"TRAK k={dim}"] = lambda t, dim=dim: trak_scores(baseline(t).truncate(dim))
    for damping in settings.dampings:
        methods[f"IF damping {damping:g}"] = lambda t, d=damping: influence_scores(baseline(t).truncate(k), d)
    return methods


def _tensors(inputs: np.ndarray, targets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(inputs), torch.from_numpy(targets)


def described_as_sgd(trajectory: Trajectory) -> Trajectory:
    """The checkpoints of an Adam run described as plain SGD: same steps and per-step learning
    rates, same weight decay, no optimizer states (no preconditioner)."""
    checkpoints = tuple(dataclasses.replace(c, optimizer_state=None) for c in trajectory.checkpoints)
    return Trajectory(checkpoints, optimizer="sgd", weight_decay=trajectory.weight_decay)


def train_and_project(scenario: Scenario, seed: int, dim: int) -> Trained:
    """Train on all attributed rows with ``seed`` and project the run to ``dim`` (an Adam run
    also as its SGD description; exact curvature only)."""
    model, trajectory = train_run(scenario, np.arange(scenario.num_train), RUN_SEED + seed)
    data = {s.label: _tensors(s.inputs, s.targets) for s in scenario.stages}
    queries = _tensors(scenario.query_inputs, scenario.query_targets)

    def project(traj: Trajectory, modes: tuple[str, ...]) -> ProjectedRun:
        return project_run(
            model, scenario.task(), traj, data, scenario.attributed.label, queries, dim,
            seed=seed, curvature_modes=modes, progress=False,
        )

    adam = trajectory.preconditioned
    run = project(trajectory, ("exact",) if adam else ("exact", "sampled"))
    state = trajectory.checkpoints[-1].load()
    return Trained(
        run,
        dict(state),
        penultimate_features(model, state, data[scenario.attributed.label][0]),
        penultimate_features(model, state, queries[0]),
        project(described_as_sgd(trajectory), ("exact",)) if adam else None,
    )


def traker_scores(scenario: Scenario, states: list[dict], dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    """TRAK's own package on the runs' final states: (single-model, ensemble) scores
    (n_query, N), or None when ``traker`` is not installed."""
    try:
        from trak import TRAKer
    except ImportError:
        return None
    import logging

    x, y = _tensors(scenario.attributed.inputs, scenario.attributed.targets)
    xq, yq = _tensors(scenario.query_inputs, scenario.query_targets)
    results = []
    for members in (states[:1], states):
        with tempfile.TemporaryDirectory() as tmp:
            traker = TRAKer(
                model=scenario.model(), task="image_classification", train_set_size=len(y), save_dir=tmp,
                device="cpu", proj_dim=dim, use_half_precision=False, logging_level=logging.ERROR,
            )
            for model_id, state in enumerate(members):
                traker.load_checkpoint(state, model_id=model_id)
                for start in range(0, len(y), 200):
                    batch = [x[start : start + 200], y[start : start + 200]]
                    traker.featurize(batch=batch, num_samples=len(batch[1]))
            traker.finalize_features()
            # traker 0.3.2 frees the CPU projector's matrix in finalize_features and, with a
            # single block (proj_dim <= 100), does not regenerate it before scoring.
            traker.projector.generate_sketch_matrix(traker.projector.generator_states[0])
            for model_id, state in enumerate(members):
                traker.start_scoring_checkpoint("queries", state, model_id, len(yq))
                traker.score(batch=[xq, yq], num_samples=len(yq))
            results.append(np.asarray(traker.finalize_scores("queries"), dtype=np.float64).T)
    return results[0], results[1]


def _best(ablations: dict[str, LDSResult], prefix: str) -> str:
    """Name of the ablation row starting with ``prefix`` with the highest LDS."""
    return max((m for m in ablations if m.startswith(prefix)), key=lambda m: ablations[m].score)


def evaluate_scenario(name: str, settings: BenchSettings, cache_dir: Path, workers: int | None) -> ScenarioReport:
    """Ground truth, runs, main table, ablations and (for (a), (b)) counterfactuals of one scenario."""
    scenario = build(name)
    repeats = settings.repeats_for(name)
    clock = time.perf_counter()
    truth = compute_ground_truth(
        ScenarioRetrain(scenario),
        scenario.num_train,
        LDSConfig(num_subsets=settings.num_subsets, repeats=repeats),
        cache_path=cache_dir / f"lds-{name}-M{settings.num_subsets}-R{repeats}.npz",
        workers=workers,
    )
    clock_truth = time.perf_counter() - clock

    clock = time.perf_counter()
    trained = [train_and_project(scenario, seed, settings.max_dim) for seed in range(settings.ensemble_runs)]
    adam = trained[0].sgd is not None
    report = ScenarioReport(name, truth, preconditioned=adam)
    report.seconds["ground truth"] = clock_truth
    report.seconds["train + project runs"] = time.perf_counter() - clock

    def lds(scores) -> LDSResult:
        return linear_datamodeling_score(np.asarray(scores), truth, num_bootstrap=settings.bootstrap)

    def add_main(method: str, fn: Method) -> None:
        clock = time.perf_counter()
        per_run = [fn(t) for t in trained]
        report.seconds[method] = (time.perf_counter() - clock) / len(trained)
        ensembles[method] = ensemble(per_run)
        report.main[method] = (lds(per_run[0]), lds(ensembles[method]))

    ensembles: dict[str, np.ndarray] = {}
    main = adam_main_methods(settings.proj_dim) if adam else main_methods(settings.proj_dim)
    for method, fn in main.items():
        add_main(method, fn)
    ablations = ablation_methods(settings, adam)
    for method, fn in ablations.items():
        report.ablations[method] = lds(fn(trained[0]))
    # Baselines at the setting that scores best on this very LDS (an optimistic tuning).
    tuned = [("IF damping", "IF (damping tuned on this LDS)"), ("TRAK k=", "TRAK (k tuned on this LDS)")]
    if adam:
        tuned.append(("SGD description", "SGD description, form and t tuned on this LDS"))
    for prefix, label in tuned:
        best = _best(report.ablations, prefix)
        add_main(label, ablations[best])
        report.notes[label] = best
    if name == "digits":  # TRAK's own package at the k that suits TRAK best (its kernel needs k < N)
        clock = time.perf_counter()
        dim = max(settings.ablation_dims, key=lambda d: report.ablations[f"TRAK k={d}"].score)
        external = traker_scores(scenario, [t.final_state for t in trained], dim)
        if external is not None:
            label = "TRAK (traker 0.3.2 package, k as tuned above)"
            report.main[label] = (lds(external[0]), lds(external[1]))
            report.notes[label] = f"k={dim}"
            report.seconds[label] = time.perf_counter() - clock

    if name in COUNTERFACTUAL_SCENARIOS:
        clock = time.perf_counter()
        chosen = [m for m in main if not m.startswith("SOURCE L=1")]
        result = subset_removal(
            {m: ensembles[m] for m in chosen},
            ScenarioRetrain(scenario),
            scenario.attributed.targets,
            scenario.query_targets,
            CounterfactualConfig(ks=settings.cf_ks, num_seeds=settings.cf_seeds),
            max_queries=settings.cf_queries,
            workers=workers,
        )
        report.cf_queries = len(result.queries)
        report.counterfactual = {m: c.flipped_fraction for m, c in result.curves.items()}
        report.seconds["counterfactual"] = time.perf_counter() - clock
    return report


def _cell(result: LDSResult | None, note: str = "") -> str:
    if result is None:
        return "-"
    return f"{result.score:.3f} [{result.ci_low:.3f}, {result.ci_high:.3f}]" + (f" ({note})" if note else "")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


BASELINES = (
    "TracIn", "TracIn (Adam preconditioner)", "TracIn (no preconditioner)", "IF (damping 1e-3)",
    "IF (damping tuned on this LDS)", "TRAK", "TRAK (k tuned on this LDS)",
)


def summary_rows(report: ScenarioReport) -> list[str]:
    """Single-model LDS of the library's default SOURCE against the best gradient baseline
    (and, for an Adam scenario, against the run's SGD description, default and tuned)."""
    (default,) = [m for m in report.main if m.startswith("SOURCE") and ("defaults" in m)]
    ours = report.main[default][0]
    row = [report.name, _cell(ours)]
    rivals = [max((b for b in BASELINES if b in report.main), key=lambda b: report.main[b][0].score)]
    if report.preconditioned:
        rivals += [SGD_DESCRIPTION, "SGD description, form and t tuned on this LDS"]
    for rival in rivals:
        theirs = report.main[rival][0]
        row += [f"{rival}: {_cell(theirs, report.notes.get(rival, ''))}", f"{ours.score - theirs.score:+.3f}",
                "yes" if ours.ci_low > theirs.ci_high else "no"]
    return row


def render(reports: list[ScenarioReport], settings: BenchSettings, total_seconds: float, mode: str) -> str:
    """The markdown report: LDS tables, ground-truth noise, ablations, counterfactuals, runtimes."""
    names = [r.name for r in reports]
    out = [
        f"# LDS benchmark ({mode})",
        "",
        f"alpha = 0.5, M = {settings.num_subsets} subsets, R retrainings per subset (below), "
        f"{reports[0].truth.num_queries} queries per scenario; cells are the LDS (mean Spearman over queries) "
        f"with a 95% basic-bootstrap interval over subsets ({settings.bootstrap} replicates). Every method uses "
        f"the same projected gradients (k = {settings.proj_dim}, Rademacher) of the same runs; ensembles "
        f"average {settings.ensemble_runs} independently trained runs.",
        "",
        "## Summary: SOURCE with the library's defaults against the best gradient baseline (single model)",
        "",
    ]
    plain = [summary_rows(r) for r in reports if not r.preconditioned]
    adam = [summary_rows(r) for r in reports if r.preconditioned]
    if plain:
        out += [_table(["scenario", "SOURCE (defaults)", "best baseline", "margin", "intervals disjoint"], plain), ""]
    if adam:
        rival = ["margin", "intervals disjoint"]
        out += [
            "AdamW scenarios: preconditioned SOURCE (defaults) against the best baseline and against the same "
            "run described as SGD (library defaults, and with the query form and time scale tuned on this LDS).",
            "",
            _table(["scenario", "SOURCE (defaults)", "best baseline", *rival, "SGD description", *rival,
                    "SGD description, tuned", *rival], adam),
            "",
        ]
    out += [
        "## Ground-truth noise",
        "",
        _table(
            ["scenario", "N (attributed rows)", "R", "split-half reliability (Spearman-Brown, R repeats)", "noise / signal std"],
            [
                [r.name, str(r.truth.num_train), str(r.truth.measurements.shape[1]),
                 f"{r.truth.noise().split_half_reliability:.3f}", f"{r.truth.noise().noise_to_signal:.3f}"]
                for r in reports
            ],
        ),
    ]
    methods = list(dict.fromkeys(m for r in reports for m in r.main))
    for label, index in (("single model", 0), (f"ensemble of {settings.ensemble_runs} runs", 1)):
        rows = [[m] + [_cell(r.main[m][index], r.notes.get(m, "")) if m in r.main else "-" for r in reports] for m in methods]
        out += ["", f"## LDS, {label}", "", _table(["method"] + names, rows)]
    ablations = list(dict.fromkeys(m for r in reports for m in r.ablations))
    rows = [[m] + [_cell(r.ablations.get(m)) for r in reports] for m in ablations]
    out += [
        "",
        f"## Ablations (single model, k = {settings.proj_dim} unless stated; each SOURCE row changes one setting "
        "of the paper form (final query) or of the per-segment form)",
        "",
        _table(["setting"] + names, rows),
    ]
    for r in reports:
        if r.counterfactual:
            rows = [[m] + [f"{v:.2f}" for v in curve] for m, curve in r.counterfactual.items()]
            out += [
                "",
                f"## Subset removal, {r.name}: fraction of {r.cf_queries} correctly classified queries flipped "
                f"after removing at most k rows (ensemble scores, margin averaged over {settings.cf_seeds} seeds)",
                "",
                _table(["method"] + [f"k={k}" for k in settings.cf_ks], rows),
            ]
    phases = list(dict.fromkeys(p for r in reports for p in r.seconds))
    rows = [[p] + [f"{r.seconds[p]:.1f}" if p in r.seconds else "-" for r in reports] for p in phases]
    out += [
        "",
        "## Runtimes (seconds; per-method rows are per run, on the cached projected run)",
        "",
        _table(["phase"] + names, rows),
        "",
        f"Total wall time: {total_seconds / 60:.1f} min.",
    ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized smoke run")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated subset of {SCENARIOS}")
    parser.add_argument("--workers", type=int, default=None, help="retraining processes (default: all cores)")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "cache", help="ground-truth cache folder")
    parser.add_argument("--out", type=Path, default=None, help="markdown report (default: results/lds-<mode>.md)")
    args = parser.parse_args(argv)
    names = [n for n in args.scenarios.split(",") if n]
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenarios {unknown}; choose from {SCENARIOS}")
    torch.set_num_threads(1)  # the retraining workers take the other cores
    settings = QUICK if args.quick else FULL
    mode = "quick" if args.quick else "full"
    start = time.perf_counter()
    reports = [evaluate_scenario(name, settings, args.cache_dir, args.workers) for name in names]
    text = render(reports, settings, time.perf_counter() - start, mode)
    print(text)
    out = args.out or ROOT / "results" / f"lds-{mode}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
