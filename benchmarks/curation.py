"""Curation benchmark: mislabel detection, harmful-row pruning checked by retraining, and the
cost of group influence against the full score matrix.

    python benchmarks/curation.py                      # everything, results/curation-*.md
    python benchmarks/curation.py --only detection     # or pruning, scale (comma-separated)
    python benchmarks/curation.py --quick              # smoke run, results/curation-*-quick.md

Setups: scikit-learn's digits (1000 training rows, 200 validation, 597 test) and breast cancer
(350 / 100 / 119), with 10% or 30% of the training labels flipped to another class, an MLP
trained with SGD + momentum either for 3 epochs (the wrong labels not yet fitted) or for 30
(fitted: the model memorises them). Every method reads the same projected gradients and
Hessians of the same run (k = 1024, ``project_run``), cached per setup under benchmarks/cache/.

* detection: precision among the top 5/10/20% and ROC-AUC of each ranking for the flipped
  rows, mean over seeds (noise draw and training); the best mean and those whose paired 95%
  interval against it contains 0 are in bold.
* pruning: rows ranked on seed 0's run by harm to the validation set (and the other SOURCE
  rankings), the top 1/2/5/10% dropped, retrained with S seeds; test accuracy change against
  the unpruned model, random rows and highest-loss rows (``source_proj.evaluation.pruning``).
* scale: group influence of a 512-query set over a 1e6 x 1024 float16 store against writing the
  full score matrix with ``retrieval.bulk.score_matrix`` and summing its rows; wall time and
  peak resident memory, each in a fresh process, in one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import t as student_t
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.metrics import roc_auc_score

from source_proj.config import SourceConfig
from source_proj.curation import CurationConfig, curate
from source_proj.curation.figures import pruning_figure, score_histogram
from source_proj.evaluation.baselines import (
    influence_self_influence,
    source_scores,
    source_self_influence,
    tracin_self_influence,
)
from source_proj.evaluation.projected_run import project_run
from source_proj.evaluation.pruning import PruningConfig, PruningResult, pruning_curve
from source_proj.evaluation.scenarios import Scenario, Stage, train_run
from source_proj.evaluation.training import TrainSettings
from source_proj.gradients.tasks import ClassificationTask

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / "cache" / "curation"
RUN_SEED = 10_000
DETECTION_FRACTIONS = (0.05, 0.1, 0.2)
DETECTION_SEEDS = 10
PRUNING_SEEDS = 20
SIGNALS_VERSION = 1


@dataclass(frozen=True)
class Setup:
    """A noisy-label training setup."""

    dataset: str  # "digits" or "breast_cancer"
    noise: float  # fraction of training labels flipped to another class
    epochs: int
    seed: int = 0

    @property
    def slug(self) -> str:
        return f"{self.dataset}-{int(100 * self.noise)}-{self.epochs}ep" + (f"-seed{self.seed}" if self.seed else "")

    @property
    def name(self) -> str:
        return f"{self.dataset} {int(100 * self.noise)}% flipped, {self.epochs} epochs"

    def data(self) -> tuple[np.ndarray, ...]:
        """x_train, noisy labels, flipped mask, x_val, y_val, x_test, y_test (standardised)."""
        loader, n_train, n_val = {"digits": (load_digits, 1000, 200), "breast_cancer": (load_breast_cancer, 350, 100)}[self.dataset]
        x, y = loader(return_X_y=True)
        order = np.random.default_rng(self.seed).permutation(len(y))
        x, y = x[order], y[order].astype(np.int64)
        std = x[:n_train].std(0)
        x = ((x - x[:n_train].mean(0)) / np.where(std > 0, std, 1.0)).astype(np.float32)
        classes = int(y.max()) + 1
        rng = np.random.default_rng([self.seed, 7])
        labels = y[:n_train].copy()
        flipped = rng.random(n_train) < self.noise
        labels[flipped] = (labels[flipped] + rng.integers(1, classes, int(flipped.sum()))) % classes
        v = slice(n_train, n_train + n_val)
        return x[:n_train], labels, flipped, x[v], y[v], x[n_train + n_val :], y[n_train + n_val :]

    def scenario(self) -> Scenario:
        x, labels, _, x_val, y_val, _, _ = self.data()
        settings = TrainSettings(epochs=self.epochs, batch_size=32, lr=0.05, momentum=0.9, weight_decay=1e-3,
                                 checkpoints_per_epoch=4 if self.epochs < 10 else 1)
        stage = Stage(0, x, labels, settings, checkpoint_stride=1 if self.epochs < 10 else 2)
        return Scenario(self.name, "classification", (stage,), 0, x_val, y_val)


HISTOGRAM_SETUP = Setup("digits", 0.3, 30)


def signals(setup: Setup, dim: int) -> dict[str, np.ndarray]:
    """Per-row scores of every method on one trained run (cached): larger = more suspicious."""
    path = CACHE / f"{setup.dataset}-{setup.noise}-{setup.epochs}-{setup.seed}-k{dim}-v{SIGNALS_VERSION}.npz"
    if path.exists():
        return dict(np.load(path))
    scenario = setup.scenario()
    x, labels, flipped, x_val, y_val, _, _ = setup.data()
    model, trajectory = train_run(scenario, np.arange(len(labels)), RUN_SEED + setup.seed)
    # Validation queries measured by their loss: score > 0 = the row raises validation loss.
    loss_task = dataclasses.replace(ClassificationTask(), measurement=ClassificationTask().loss)
    train = (torch.from_numpy(x), torch.from_numpy(labels))
    run = project_run(model, loss_task, trajectory, {0: train}, 0, (torch.from_numpy(x_val), torch.from_numpy(y_val)),
                      dim, seed=0, curvature_modes=("exact",), progress=False)
    config = SourceConfig(proj_dim=dim, seed=0, progress=False)
    task = ClassificationTask()
    with torch.no_grad():
        final_loss = task.loss(model(train[0]), train[1]).double().numpy()
        margin = task.measurement(model(train[0]), train[1]).double().numpy()
        losses = []
        for ckpt in trajectory.checkpoints:
            net = scenario.model()
            net.load_state_dict(ckpt.load())
            losses.append(task.loss(net(train[0]), train[1]).double().numpy())
    self_inf = source_self_influence(run, config).numpy()
    harm = source_scores(run, config).sum(dim=0).numpy()
    out = {
        "flipped": flipped,
        "SOURCE self-influence": self_inf,
        "SOURCE held-out loss (loss + self-influence)": final_loss + self_inf,
        "SOURCE harm to validation": harm,
        "SOURCE combined (held-out loss, harm)": curate(self_influence=self_inf, losses=final_loss, harm=harm,
                                                        config=CurationConfig(rank_by="combined")).column("score"),
        "training loss (final)": final_loss,
        "margin (final), negated": -margin,
        "TracIn self-influence": tracin_self_influence(run).numpy(),
        "IF self-influence (damping 1e-3)": influence_self_influence(run, 1e-3).numpy(),
        "(reference) mean training loss over checkpoints": np.mean(losses, axis=0),
    }
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _machine() -> str:
    model = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model}, {multiprocessing.cpu_count()} cores, torch {torch.__version__}"


def _signals_worker(args: tuple[Setup, int]) -> dict[str, np.ndarray]:
    torch.set_num_threads(1)
    return signals(*args)


def all_signals(setups: list[Setup], dim: int, workers: int) -> list[dict[str, np.ndarray]]:
    """``signals`` of every setup, computed in ``workers`` processes."""
    if workers <= 1:
        return [signals(s, dim) for s in setups]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return pool.map(_signals_worker, [(s, dim) for s in setups])


# ---------------------------------------------------------------------------------- detection
def detection_metrics(scores: np.ndarray, flipped: np.ndarray) -> list[float]:
    """Precision among the top 5/10/20% and ROC-AUC of ``scores`` for the ``flipped`` rows."""
    order = np.argsort(-scores, kind="stable")
    precision = [float(flipped[order[: max(1, round(f * len(scores)))]].mean()) for f in DETECTION_FRACTIONS]
    return precision + [float(roc_auc_score(flipped, scores))]


# The rankings the issue compares SOURCE's detectors against (the last table row, a
# training-dynamics reference, is reported but is not one of them).
DETECTION_BASELINES = ("training loss (final)", "margin (final), negated", "TracIn self-influence",
                       "IF self-influence (damping 1e-3)")
DETECTORS = ("SOURCE self-influence", "SOURCE held-out loss (loss + self-influence)")


def tied_best(values: dict[str, np.ndarray], methods: list[str], column: int) -> set[str]:
    """The method of ``methods`` with the best mean on ``column`` of ``values`` (seeds, 4), and
    every method whose paired 95% t-interval of the difference to it contains 0."""
    best = max(methods, key=lambda m: values[m][:, column].mean())
    tied = set()
    for m in methods:
        diff = values[m][:, column] - values[best][:, column]
        half = student_t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else 0.0
        if m == best or abs(diff.mean()) <= half:
            tied.add(m)
    return tied


def detection(setups: list[Setup], seeds: int, dim: int, workers: int) -> str:
    runs = [dataclasses.replace(s, seed=i) for s in setups for i in range(seeds)]
    results = all_signals(runs, dim, workers)
    columns = ["top 5%", "top 10%", "top 20%", "ROC-AUC"]
    out = []
    summary = []
    for s in setups:
        mine = [r for run, r in zip(runs, results) if dataclasses.replace(run, seed=0) == s]
        methods = [m for m in mine[0] if m != "flipped"]
        values = {m: np.array([detection_metrics(r[m], r["flipped"]) for r in mine]) for m in methods}  # (seeds, 4)
        bold = [tied_best(values, methods, j) for j in range(len(columns))]
        rows = []
        for m in methods:
            cells = []
            for j in range(len(columns)):
                v = values[m][:, j]
                cell = f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0:.3f}"
                cells.append(f"**{cell}**" if m in bold[j] else cell)
            rows.append([m] + cells)
        flipped_share = np.mean([r["flipped"].mean() for r in mine])
        if s == HISTOGRAM_SETUP:
            own = mine[0]["SOURCE self-influence"]
            flags = own >= np.quantile(own, 1 - mine[0]["flipped"].mean())
            fig = score_histogram(own, flags, label=f"SOURCE self-influence ({s.name}, seed 0)")
            _save_figure(fig, f"curation-self-influence-{s.slug}.png")
        out += ["", f"### {s.name} ({flipped_share:.1%} of rows flipped)", "", _table(["ranking"] + columns, rows)]
        cells = [s.name]
        for d in DETECTORS:
            lost = [columns[j] for j in range(len(columns)) if d not in tied_best(values, [d, *DETECTION_BASELINES], j)]
            cells.append(f"{values[d][:, 3].mean():.3f}, " + ("best/tied on all four" if not lost else "behind on " + ", ".join(lost)))
        best_baseline = max(DETECTION_BASELINES, key=lambda m: values[m][:, 3].mean())
        cells.append(f"{values[best_baseline][:, 3].mean():.3f} ({best_baseline})")
        summary.append(cells)
    head = [
        "## Mislabel detection",
        "",
        f"Mean ± standard deviation over {seeds} seeds (label noise draw, training run); k = {dim}. Bold: the best "
        "mean and every ranking whose paired 95% t-interval of the difference to it contains 0. All rankings are "
        "'larger = more suspicious'; the last row is not an attribution method but a training-dynamics reference.",
        "",
        "Summary: ROC-AUC of each SOURCE detector, and whether it is best or tied-best (the rule above) against the "
        f"issue's baselines ({', '.join(DETECTION_BASELINES)}) on each of the four columns.",
        "",
        _table(["setup", *DETECTORS, "best baseline (ROC-AUC)"], summary),
    ]
    return "\n".join(head + out)


# ------------------------------------------------------------------------------------ pruning
@dataclass(frozen=True)
class AccuracyRetrain:
    """Picklable ``retrain(indices, seed) -> test accuracy`` of a setup."""

    setup: Setup

    def __call__(self, indices: np.ndarray, seed: int) -> float:
        torch.set_num_threads(1)
        _, _, _, _, _, x_test, y_test = self.setup.data()
        model, _ = train_run(self.setup.scenario(), indices, seed)
        with torch.no_grad():
            return float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())


def cached_pruning(setup: Setup, rankings: dict, num_train: int, config: PruningConfig, dim: int, workers: int) -> PruningResult:
    """``pruning_curve`` of a setup, its metrics cached under benchmarks/cache/."""
    key = f"{setup.slug}-k{dim}-{config.num_seeds}seeds-{'-'.join(map(str, config.fractions))}-v{SIGNALS_VERSION}"
    path = CACHE / f"pruning-{key}.npz"
    if path.exists():
        data = np.load(path)
        if all(f"metric {name}" in data for name in [*rankings, "random"]):
            metrics = {name: data[f"metric {name}"] for name in [*rankings, "random"]}
            return PruningResult(data["fractions"], data["removed"], tuple(data["seeds"].tolist()), data["full"],
                                 metrics, config.confidence)
    result = pruning_curve(AccuracyRetrain(setup), rankings, num_train, config, workers=workers, progress=False)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, fractions=result.fractions, removed=result.removed, seeds=np.asarray(result.seeds), full=result.full,
             **{f"metric {name}": values for name, values in result.metrics.items()})
    return result


def _save_figure(fig: object, name: str) -> None:
    fig.savefig(ROOT / "results" / name, dpi=110)
    print(f"wrote {ROOT / 'results' / name}", file=sys.stderr)


PRUNING_RANKINGS = ("SOURCE harm to validation", "SOURCE held-out loss (loss + self-influence)",
                    "SOURCE combined (held-out loss, harm)", "training loss (final)")
# A reference arm: what a perfect mislabel detector removes (the flipped rows, in random order).
ORACLE = "(reference) flipped rows first"


def oracle_scores(flipped: np.ndarray, seed: int) -> np.ndarray:
    """Scores that put every flipped row first, in a random order within each group."""
    return flipped.astype(np.float64) + 0.5 * np.random.default_rng([seed, 0x0AC1E]).random(len(flipped))


def pruning(setups: list[Setup], config: PruningConfig, dim: int, workers: int) -> str:
    out = [
        "## Harmful-row pruning, checked by retraining",
        "",
        f"Rows ranked on one run (seed 0), the top fraction dropped, the model retrained with {config.num_seeds} "
        f"seeds (the same seeds for every arm); test accuracy (mean and {int(100 * config.confidence)}% t-interval "
        "over seeds) and its change against the unpruned model, paired by seed. 'random' draws new rows per seed. "
        "A cell is bold when its interval lies entirely above the intervals of the unpruned model, random rows and "
        "highest-loss rows at that fraction. The oracle arm removes flipped rows only (in random order among "
        "them): what a perfect mislabel detector would remove.",
    ]
    verdicts = []
    for s, sig in zip(setups, all_signals(setups, dim, workers)):
        rankings = {name: sig[name] for name in PRUNING_RANKINGS} | {ORACLE: oracle_scores(sig["flipped"], s.seed)}
        started = time.time()
        result = cached_pruning(s, rankings, len(sig["flipped"]), config, dim, workers)
        _save_figure(pruning_figure(result, ylabel="change of test accuracy"), f"curation-pruning-{s.slug}.png")
        rows = result.summary()
        full = rows[0]
        by = {(r["ranking"], r["fraction"]): r for r in rows[1:]}
        table = [["unpruned", "-", f"{full['mean']:.4f} [{full['low']:.4f}, {full['high']:.4f}]", "-", "-"]]
        won, oracle_won = [], []
        for name in [*PRUNING_RANKINGS, ORACLE, "random"]:
            for f in config.fractions:
                r = by[name, f]
                others = [full, by["random", f], by["training loss (final)", f]]
                above = all(r["low"] > o["high"] for o in others)
                beats = name.startswith("SOURCE") and above
                if beats:
                    won.append(f"{name} at {f:.0%}")
                if name == ORACLE and above:
                    oracle_won.append(f"{f:.0%}")
                cell = f"{r['mean']:.4f} [{r['low']:.4f}, {r['high']:.4f}]"
                flips = float(sig["flipped"][np.argsort(-rankings[name], kind="stable")[: r["removed"]]].mean()) if name != "random" else float("nan")
                table.append([name, f"{f:.0%} ({r['removed']})", f"**{cell}**" if beats else cell,
                              f"{r['change']:+.4f} [{r['change_low']:+.4f}, {r['change_high']:+.4f}]",
                              "-" if name == "random" else f"{flips:.2f}"])
        verdicts.append([s.name, "; ".join(won) or "none", ", ".join(oracle_won) or "none"])
        out += ["", f"### {s.name} ({time.time() - started:.0f} s)", "",
                _table(["ranking", "removed", "test accuracy", "change vs unpruned", "share of removed rows flipped"], table)]
    out[3:3] = ["", "SOURCE rankings whose test-accuracy interval lies above all three baselines' (unpruned, random, "
                f"highest loss), and the fractions at which the oracle '{ORACLE}' itself does:", "",
                _table(["setup", "SOURCE rankings and fractions", "oracle"], verdicts)]
    return "\n".join(out)


# -------------------------------------------------------------------------------------- scale
def _scale_child(kind: str, store_path: str, queries_path: str, work: str, queue: multiprocessing.Queue) -> None:
    from source_proj.features.store import FeatureStore
    from source_proj.retrieval.bulk import score_matrix
    from source_proj.retrieval.group import group_influence

    store = FeatureStore.open(store_path)
    queries = np.load(queries_path)
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * page

    base, peak = rss(), [0]
    done = threading.Event()

    def watch() -> None:  # the resident set, sampled every 5 ms during the call
        while not done.wait(0.005):
            peak[0] = max(peak[0], rss())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.perf_counter()
    if kind == "group":
        values = group_influence(store, queries, progress=False)
        disk = 0
    else:
        out = Path(work) / "scores.zarr"
        scores = score_matrix(store, queries, out, progress=False)
        values = np.zeros(store.layout.n_rows)
        step = scores.chunks[1]
        for start in range(0, store.layout.n_rows, step):  # row sums, block by block
            values[start : start + step] = scores[:, start : start + step].astype(np.float64).sum(axis=0)
        disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    seconds = time.perf_counter() - started
    done.set()
    watcher.join()
    np.save(Path(work) / f"{kind}.npy", values)
    queue.put({"seconds": seconds, "peak_mib": max(peak[0], rss()) / 2**20, "base_mib": base / 2**20, "disk_mib": disk / 2**20})


def _measure(kind: str, *args: str) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_scale_child, args=(kind, *args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def scale(n_rows: int, dim: int, n_query: int) -> str:
    from source_proj.features.featurize import featurize
    from source_proj.features.layout import StoreLayout
    from source_proj.features.store import FeatureStore

    work = Path(tempfile.mkdtemp(prefix="curation-scale-"))
    try:
        store_path = work / "store.zarr"
        layout = StoreLayout(n_rows, dim, "float16", chunk_rows=16384)
        store = FeatureStore.create(store_path, layout, {"benchmark": "curation scale"})

        def rows(start: int, stop: int) -> np.ndarray:
            gen = torch.Generator().manual_seed(start)
            return torch.randn(stop - start, dim, generator=gen).numpy()

        started = time.perf_counter()
        featurize(store, rows, progress=False)
        build = time.perf_counter() - started
        queries = np.random.default_rng(1).standard_normal((n_query, dim)).astype(np.float32)
        np.save(work / "queries.npy", queries)
        group = _measure("group", str(store_path), str(work / "queries.npy"), str(work))
        matrix = _measure("matrix", str(store_path), str(work / "queries.npy"), str(work))
        a, b = np.load(work / "group.npy"), np.load(work / "matrix.npy")
        scale_ref = np.linalg.norm(queries.sum(0)) * np.sqrt(dim) + np.abs(b).max()
        agree = float(np.abs(a - b).max() / scale_ref)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [
        ["group influence (retrieval.group)", f"{group['seconds']:.1f}", f"{group['peak_mib']:.0f}",
         f"{group['peak_mib'] - group['base_mib']:.0f}", "0"],
        ["score matrix (retrieval.bulk) + row sums", f"{matrix['seconds']:.1f}", f"{matrix['peak_mib']:.0f}",
         f"{matrix['peak_mib'] - matrix['base_mib']:.0f}", f"{matrix['disk_mib']:.0f}"],
        ["ratio (matrix / group)", f"{matrix['seconds'] / group['seconds']:.1f}x", f"{matrix['peak_mib'] / group['peak_mib']:.1f}x",
         f"{(matrix['peak_mib'] - matrix['base_mib']) / max(group['peak_mib'] - group['base_mib'], 1):.1f}x", "-"],
    ]
    return "\n".join([
        "## Group influence against the full score matrix",
        "",
        f"Store: {n_rows} rows x {dim} features, float16 (built in {build:.0f} s); {n_query} queries. Each method "
        "runs in a fresh process; peak resident memory of that process (including the interpreter, torch and the "
        "queries; resident set sampled every 5 ms during the call; 'above start' subtracts the resident set just before it); disk = the score matrix written. Largest difference between the two results, relative to "
        f"|sum of queries| sqrt(D) + max |value|: {agree:.1e}.",
        "",
        _table(["method", "wall time (s)", "peak RSS (MiB)", "peak RSS above start (MiB)", "disk (MiB)"], rows),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--only", default="detection,pruning,scale", help="comma-separated sections")
    parser.add_argument("--workers", type=int, default=2, help="processes for runs and retrainings")
    args = parser.parse_args()
    sections = args.only.split(",")
    quick = args.quick
    dim = 64 if quick else 1024
    datasets = ("digits", "breast_cancer")
    setups = [Setup(d, noise, epochs) for d in datasets for noise in (0.1, 0.3) for epochs in (3, 30)]
    suffix = "-quick" if quick else ""
    stamp = f"{time.strftime('%Y-%m-%d')}, {_machine()}"
    for section in sections:
        started = time.time()
        if section == "detection":
            body = detection(setups[:2] if quick else setups, 1 if quick else DETECTION_SEEDS, dim, args.workers)
        elif section == "pruning":
            config = PruningConfig(fractions=(0.01, 0.02, 0.05, 0.1), num_seeds=2 if quick else PRUNING_SEEDS, seed=0)
            chosen = setups[:1] if quick else [s for s in setups if s.dataset == "digits" or s.epochs == 30]
            body = pruning(chosen, config, dim, args.workers)
        elif section == "scale":
            body = scale(100_000 if quick else 1_000_000, 1024, 64 if quick else 512)
        else:
            raise SystemExit(f"unknown section {section!r}")
        text = f"# Curation benchmark: {section}{' (quick)' if quick else ''}\n\n{stamp}; {time.time() - started:.0f} s.\n\n{body}\n"
        path = ROOT / "results" / f"curation-{section}{suffix}.md"
        path.write_text(text)
        print(text)
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
