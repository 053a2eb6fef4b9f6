"""Latency of one query against a fitted feature store, by phase, against its floor.

Setup (``setup``, not timed): a GPT-2 built from a config (``--size``, shapes of
``benchmarks/lm.py``'s SIZES, byte vocabulary, 64 tokens; ``proj_structure="factored"``: the
factored projection), trained a few AdamW steps with a checkpoint and its optimizer state saved
to files every few steps (``--checkpoints``), a task file (``task.py:task``) that builds the
``TaskSpec`` from those files, and a feature store of ``--rows`` training rows fitted with
``SourceAttributor.fit(train, store=...)``.

Then, each in a fresh process (``--repeats`` times; median and min):

* ``floor``: the bare work of one query: its projected gradients at the checkpoints its query
  form needs (checkpoint files read, Adam's D^{1/2} from the optimizer state, per-example
  gradients, projection; ``projected_gradients``, no checks, no store), and the exact search
  alone (``exact_proponents_opponents`` on a store opened without checks);
* ``api``: ``SourceAttributor(...)``, ``use_store(path)`` and ``topk(query, k=10)`` timed by phase:
  the attributor's construction, opening and checking the store, the query's features (its data
  check and its gradients), the search, and the sum; the ratio of the sum to the floor;
* ``cli``: ``python -m source_proj.cli.main topk --task task.py:task --store ...``, end to end
  (interpreter start to exit), and ``import torch`` alone, in its own fresh process;
* ``cold floor``: the floor as a program of its own, ``cold_floor.py`` (written into the work
  folder), end to end: a fresh interpreter imports the task file (torch, transformers), builds
  the model, and does the floor's work with the rank-one fits the store keeps (the answer the
  command gives: its proponents are checked equal). The attributor it takes its projection and
  preconditioner from is built in it, timed and subtracted (library set-up, not the floor);
* ``warm process``: ``topk --query-files -`` in one process fed ``--queries`` query files (the
  task's query row and other rows) one line at a time: the time to the first answer from the
  start, and each later answer's time from writing its line to reading its JSON line.

The goal (issue #27): the whole one-query ``topk`` at most 1.5 x (query gradients + search). A
cold command cannot meet it against the in-process floor (its imports alone exceed it): it is
compared with the cold floor as well, and a warm process's later queries with the floor.

Usage: ``python benchmarks/query_latency.py [--size 10M] [--repeats 3] [--queries 5] [--workdir DIR]
[--profile FILE] [--without-fits] [--label TEXT]`` (``--profile`` writes a cProfile of one ``api``
run; ``--without-fits`` sets the store's rank-one fits of D^{1/2} aside, as before the fit kept them).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SIZES = {"1M": (128, 4, 4), "10M": (256, 12, 8), "30M": (512, 9, 8)}  # as benchmarks/lm.py
TOKENS, VOCAB, K = 64, 256, 10
MODEL_IMPORT = "import torch + the task's GPT-2 (transformers)"
# The floor's work done a second time in its process (what a warm process's later query compares with).
REPEATED = ("query gradients, again in the process", "search, again in the process")

TASK_FILE = '''
import json
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from source_proj.cli.task_spec import TaskSpec
from source_proj.gradients.causal_lm import CausalLMTask
from source_proj.trajectory.checkpoints import Checkpoint, Trajectory

HERE = Path(__file__).resolve().parent


def task():
    meta = json.loads((HERE / "run.json").read_text())
    model = GPT2LMHeadModel(GPT2Config(**meta["config"], attn_implementation="eager"))
    checkpoints = [Checkpoint(str(HERE / c["state"]), steps=c["steps"], lr=c["lr"],
                              optimizer_state=str(HERE / c["optimizer"])) for c in meta["checkpoints"]]
    trajectory = Trajectory(checkpoints, optimizer="adamw", weight_decay=meta["weight_decay"])
    data = torch.load(HERE / "rows.pt")
    return TaskSpec(model=model, task=CausalLMTask(reduction="mean"), trajectory=trajectory, train={"input_ids": data["train"]},
                    queries={"input_ids": data["queries"]}, config=meta["settings"])
'''


def peak_rss() -> int:
    """This process's peak resident memory (VmHWM), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def setup(work: Path, size: str, rows: int, n_checkpoints: int, steps: int) -> None:
    """Train the run, save its checkpoints, write the task file and fit the store."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    width, layers, heads = SIZES[size]
    config = dict(vocab_size=VOCAB, n_positions=TOKENS, n_embd=width, n_layer=layers, n_head=heads,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**config, attn_implementation="eager"))
    gen = torch.Generator().manual_seed(0)
    train = torch.randint(0, VOCAB, (rows, TOKENS), generator=gen)
    queries = torch.randint(0, VOCAB, (1, TOKENS), generator=gen)
    torch.save({"train": train, "queries": queries}, work / "rows.pt")
    lr, decay = 1e-3, 0.01
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=decay)
    checkpoints = []
    for c in range(n_checkpoints):
        for _ in range(steps):
            batch = train[torch.randint(0, rows, (8,), generator=gen)]
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        state, optim = f"checkpoint-{c}.pt", f"optimizer-{c}.pt"
        torch.save(model.state_dict(), work / state)
        torch.save(opt.state_dict(), work / optim)
        checkpoints.append({"state": state, "optimizer": optim, "steps": steps, "lr": lr})
    # "factored": what "auto" chose for these models when the results were measured (it now
    # keeps the grouped projection up to 10M parameters for models with embeddings).
    settings = {"proj_dim": 1024, "proj_structure": "factored", "num_segments": min(3, n_checkpoints)}
    meta = {"config": config, "checkpoints": checkpoints, "weight_decay": decay, "settings": settings}
    (work / "run.json").write_text(json.dumps(meta))
    (work / "task.py").write_text(TASK_FILE)
    from source_proj.cli.task_spec import load_task
    from source_proj.config import SourceConfig

    spec = load_task(f"{work / 'task.py'}:task")
    spec.attributor(SourceConfig(**settings, progress=False)).fit(spec.train, store=work / "store.zarr")


def _spec(work: Path):
    from source_proj.cli.task_spec import load_task

    return load_task(f"{work / 'task.py'}:task")


def _config(store_path: Path):
    from source_proj.features.store import FeatureStore
    from source_proj.store_fit import store_config

    return store_config(FeatureStore.open(store_path), progress=False)


def _floor_run(att, spec, store_path: Path, scale_of) -> tuple[float, float, float, object]:
    """The floor's work: the query's projected gradients at the checkpoints its query form needs
    (checkpoint files read, Adam's D^{1/2}, ``projected_gradients``) and the exact search
    (``exact_proponents_opponents`` on the store opened without checks). ``scale_of(c)``: D^{1/2}
    at checkpoint c as the projection applies it, and the seconds spent making it that are not
    the floor's. Returns (gradients s, search s, set-aside s, the search's results)."""
    import torch

    from source_proj.features.store import FeatureStore
    from source_proj.gradients.data import as_examples
    from source_proj.projection.projected import projected_gradients
    from source_proj.retrieval.exact import exact_proponents_opponents

    model_fn, traj = att.model_fn, att.trajectory
    inputs, targets = as_examples(spec.queries, "queries").rows(0, 1, att.device)
    groups = att.query_form.query_checkpoints(att.segments, len(traj.checkpoints))
    t0 = time.perf_counter()
    parts, aside = [], 0.0
    for group in groups:
        states = []
        for c in group:
            params, consts = model_fn.split_state(model_fn.canonical_state(traj.checkpoints[c].load(), f"checkpoint {c}"),
                                                  att.device)
            scale, spent = scale_of(c)
            aside += spent
            states.append((params, consts, f"checkpoint {c}", scale))
        projected = projected_gradients(model_fn, states, att.task.measurement, inputs, targets, att.projection_at(group[0]))
        parts.append(-projected / len(group))  # the query features' sign and mean over the group, as the library's
    gradients = time.perf_counter() - t0 - aside
    q = torch.cat(parts, dim=1).numpy()
    store = FeatureStore.open(store_path)
    t0 = time.perf_counter()
    found = exact_proponents_opponents(store, q, K, progress=False)
    return gradients, time.perf_counter() - t0, aside, found


def floor(work: Path) -> dict:
    """The bare query gradients and the bare search, each timed alone (no checks, no digests;
    the rank-one fits of D^{1/2} made here and timed apart)."""
    from source_proj.projection.kronecker import FactoredProjection
    from source_proj.trajectory.digests import FileDigests

    spec = _spec(work)
    store_path = work / "store.zarr"
    att = spec.attributor(_config(store_path))
    # The states' digests from the store's cache, as open_store gives them: D^{1/2}'s reads are
    # compared with the fast digest only.
    att.preconditioner.use_file_digests(FileDigests.load(store_path))

    fits: dict[int, object] = {}

    def fitted(c: int):
        if c in fits:  # a later query in the same process: the fit kept, as the attributor keeps it
            return fits[c], 0.0
        scale = att.preconditioner.sqrt_scale(c)
        if not (isinstance(att.projection, FactoredProjection) and scale is not None):
            return scale, 0.0
        t = time.perf_counter()
        fits[c] = att.projection.fit_scale(scale)  # prepared once by the fit (FITS_FILE)
        return fits[c], time.perf_counter() - t

    gradients, search, fitting, _ = _floor_run(att, spec, store_path, fitted)
    again, search_again, _, _ = _floor_run(att, spec, store_path, fitted)
    return {"query gradients": gradients, "search": search, "rank-one fits": fitting,
            "query gradients, again in the process": again, "search, again in the process": search_again}


# Loads this file by its path: benchmarks/ on sys.path would shadow modules (distributed, projection, ...).
COLD_FLOOR = """import importlib.util
spec = importlib.util.spec_from_file_location("query_latency", {path!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.cold_floor({work!r})
"""


def cold_floor(work: str) -> None:
    """The body of ``cold_floor.py``: the floor in a fresh process, with the store's rank-one
    fits. Prints the seconds of the attributor's set-up (not the floor's) and the proponents."""
    spec = _spec(Path(work))  # the task file's imports and its model
    import torch

    from source_proj.store_fit import load_rank_one_fits, use_file_digests
    from source_proj.trajectory.digests import FileDigests

    torch.set_num_threads(1)
    store_path = Path(work) / "store.zarr"
    config = _config(store_path)
    t = time.perf_counter()
    att = spec.attributor(config)
    use_file_digests(att, FileDigests.load(store_path))
    att.use_rank_one_fits(load_rank_one_fits(store_path))
    setup = time.perf_counter() - t
    _, _, _, (proponents, _) = _floor_run(att, spec, store_path, lambda c: (att.gradient_scale(c), 0.0))
    print(json.dumps({"set-up": setup, "proponents": proponents.ids[0].tolist()}))


def _timed(function, times: dict[str, float], key: str):
    """``function``, recording the seconds of each call in ``times[key]``."""

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            times[key] = time.perf_counter() - t

    return timed


def api(work: Path, profile: str | None) -> dict:
    """``SourceAttributor(...)``, ``use_store`` and ``topk`` for one query, by phase."""
    from source_proj.retrieval import exact

    spec = _spec(work)
    store_path = work / "store.zarr"
    config = _config(store_path)
    times: dict[str, float] = {}
    import source_proj.attributor as attributor_module

    attributor_module.exact_proponents_opponents = _timed(exact.exact_proponents_opponents, times, "search")
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    t0 = time.perf_counter()
    att = spec.attributor(config)
    t1 = time.perf_counter()
    att.use_store(store_path)
    t2 = time.perf_counter()
    att.query_features = _timed(att.query_features, times, "query features")
    att.topk(spec.queries, K)
    t3 = time.perf_counter()
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(profile)
    return {
        "construct attributor": t1 - t0,
        "open + check store": t2 - t1,
        "query features": times["query features"],
        "search": times["search"],
        "rest of topk": (t3 - t2) - times["query features"] - times["search"],
        "total": t3 - t0,
        "peak RSS (MiB)": peak_rss() / 2**20,
    }


def _fresh(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=ENV, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _timed_command(command: list[str]) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (user + system) and standard output of ``command`` in a fresh process."""
    before = os.times()
    t = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, text=True)
    wall = time.perf_counter() - t
    after = os.times()
    if done.returncode != 0:
        raise RuntimeError(f"{command} failed: {done.stderr[-2000:]}")
    return wall, (after.children_user - before.children_user) + (after.children_system - before.children_system), done.stdout


def _topk_command(work: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "source_proj.cli.main", "topk", "--task", f"{work / 'task.py'}:task",
            "--store", str(work / "store.zarr"), "-k", str(K), "--quiet", *options]


def _cli_proponents(work: Path) -> list[int]:
    """The proponents of query 0 in the command's output (topk.csv), best first."""
    with (work / "topk.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["kind"] == "proponents" and r["query"] == "0"]
    return [int(r["train_id"]) for r in sorted(rows, key=lambda r: int(r["rank"]))]


def cli(work: Path) -> dict:
    wall, cpu, _ = _timed_command(_topk_command(work, "--output", str(work / "topk.csv")))
    import_wall, import_cpu, _ = _timed_command([sys.executable, "-c", "import torch"])
    model_wall, _, _ = _timed_command([sys.executable, "-c", "import torch; from transformers import GPT2Config, GPT2LMHeadModel"])
    script = work / "cold_floor.py"
    script.write_text(COLD_FLOOR.format(path=str(Path(__file__).resolve()), work=str(work)))
    cold_wall, _, out = _timed_command([sys.executable, str(script)])
    cold = json.loads(out.strip().splitlines()[-1])
    if cold["proponents"] != _cli_proponents(work):
        raise RuntimeError(f"the cold floor's proponents {cold['proponents']} are not the command's {_cli_proponents(work)}")
    return {"whole command": wall, "whole command, CPU": cpu, "import torch": import_wall, "import torch, CPU": import_cpu,
            MODEL_IMPORT: model_wall, "cold floor (fresh process)": cold_wall - cold["set-up"],
            "cold floor: attributor set-up (subtracted)": cold["set-up"]}


def query_files(work: Path, count: int) -> list[str]:
    """``count`` query files of one row each: the task's query row first, then random rows."""
    import torch

    rows = torch.load(work / "rows.pt")["queries"]
    gen = torch.Generator().manual_seed(1)
    paths = []
    for i in range(count):
        path = work / f"query-{i}.pt"
        torch.save({"input_ids": rows if i == 0 else torch.randint(0, VOCAB, rows.shape, generator=gen)}, path)
        paths.append(str(path))
    return paths


def warm_process(work: Path, files: list[str]) -> dict:
    """``topk --query-files -`` fed ``files`` one line at a time: seconds from the start to the
    first answer, and from writing each later line to reading its answer (median)."""
    t0 = time.perf_counter()
    process = subprocess.Popen(_topk_command(work, "--query-files", "-"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, env=ENV)
    assert process.stdin is not None and process.stdout is not None
    times, answers = [], []
    for path in files:
        t = time.perf_counter()
        process.stdin.write(path + "\n")
        process.stdin.flush()
        answers.append(json.loads(process.stdout.readline()))
        times.append(time.perf_counter() - (t if times else t0))
    process.stdin.close()
    if process.wait() != 0 or any("error" in a for a in answers):
        raise RuntimeError(f"topk --query-files failed: {[a.get('error') for a in answers]}")
    first = [r["train_id"] for r in answers[0]["results"] if r["kind"] == "proponents"]
    if first != _cli_proponents(work):
        raise RuntimeError(f"the warm process's proponents {first} are not the command's {_cli_proponents(work)}")
    return {"warm process: start to first answer": times[0], "warm process: each later query": statistics.median(times[1:])}


def _stats(runs: list[dict]) -> dict[str, tuple[float, float]]:
    return {key: (statistics.median(r[key] for r in runs), min(r[key] for r in runs)) for key in runs[0]}


def report(work: Path, size: str, repeats: int, n_queries: int, profile: str | None) -> str:
    import torch

    files = query_files(work, n_queries)
    floors, apis, clis = [], [], []
    for i in range(repeats):
        floors.append(_fresh(["--measure", "floor", "--workdir", str(work)]))
        apis.append(_fresh(["--measure", "api", "--workdir", str(work),
                            *(["--profile", profile] if profile and i == 0 else [])]))
        clis.append({**cli(work), **warm_process(work, files)})
    f, a, c = _stats(floors), _stats(apis), _stats(clis)
    goal = 1.5 * (f["query gradients"][0] + f["search"][0])
    api_total = a["total"][0]
    cli_total = c["whole command"][0]
    cold_floor = c["cold floor (fresh process)"][0]
    later = c["warm process: each later query"][0]
    floor_again = sum(f[key][0] for key in REPEATED)
    lines = [
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
        f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, torch {torch.__version__}, 1 thread, "
        f"GPT-2 {size} ({SIZES[size]}), {repeats} repeats, fresh process each",
        "",
        "| phase | median (s) | min (s) | median / floor total |",
        "|---|---|---|---|",
    ]
    floor_total = f["query gradients"][0] + f["search"][0]
    for name, source in (("floor: query gradients", f["query gradients"]), ("floor: search", f["search"]),
                         ("not in the floor: rank-one fits of D^1/2", f["rank-one fits"]),
                         *((f"floor, {key}", f[key]) for key in REPEATED)):
        lines.append(f"| {name} | {source[0]:.3f} | {source[1]:.3f} | {source[0] / floor_total:.2f} |")
    for name in ("construct attributor", "open + check store", "query features", "search", "rest of topk", "total"):
        lines.append(f"| api: {name} | {a[name][0]:.3f} | {a[name][1]:.3f} | {a[name][0] / floor_total:.2f} |")
    for name in c:
        lines.append(f"| cli: {name} | {c[name][0]:.3f} | {c[name][1]:.3f} | {c[name][0] / floor_total:.2f} |")
    lines += [
        "",
        f"goal 1.5 x (query gradients + search) = {goal:.3f} s; api total {api_total:.3f} s "
        f"({'met' if api_total <= goal else 'not met'}, {api_total / floor_total:.2f} x); cli whole command "
        f"{cli_total:.3f} s ({'met' if cli_total <= goal else 'not met'}, {cli_total / floor_total:.2f} x; "
        f"without `import torch`: {(cli_total - c['import torch'][0]) / floor_total:.2f} x; without it and the "
        f"task's transformers import: {(cli_total - c[MODEL_IMPORT][0]) / floor_total:.2f} x); api peak RSS "
        f"{a['peak RSS (MiB)'][0]:.0f} MiB",
        "",
        f"cold: cli whole command / cold floor = {cli_total:.3f} / {cold_floor:.3f} s = {cli_total / cold_floor:.2f} x "
        f"({'met' if cli_total <= 1.5 * cold_floor else 'not met'} against 1.5 x the cold floor); warm process "
        f"({n_queries} query files, one row each): each query after the first {later:.3f} s = "
        f"{later / floor_total:.2f} x the floor ({'met' if later <= goal else 'not met'}) and "
        f"{later / floor_again:.2f} x the floor run again in its process ({floor_again:.3f} s; "
        f"{'met' if later <= 1.5 * floor_again else 'not met'}), first answer "
        f"{c['warm process: start to first answer'][0]:.3f} s from the start",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="10M", choices=sorted(SIZES))
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="AdamW steps between checkpoints")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--queries", type=int, default=5, help="query files fed to the warm process (at least 2)")
    parser.add_argument("--workdir", help="keeps the run and the store (reused when present)")
    parser.add_argument("--label", default="", help="a heading for this table in the results file")
    parser.add_argument("--profile", help="write a cProfile of the first api run here")
    parser.add_argument("--without-fits", action="store_true",
                        help="set the store's rank-one fits aside for the run (as before the fit kept them)")
    parser.add_argument("--measure", choices=("floor", "api"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    if args.measure:
        work = Path(args.workdir)
        print(json.dumps(floor(work) if args.measure == "floor" else api(work, args.profile)))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="query-latency-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "store.zarr").exists():
        setup(work, args.size, args.rows, args.checkpoints, args.steps)
    from source_proj.store_fit import FITS_FILE

    fits = work / "store.zarr" / FITS_FILE
    aside = fits.with_name(f"{FITS_FILE}.aside")
    if args.without_fits:
        fits.rename(aside)
    try:
        table = report(work, args.size, args.repeats, max(2, args.queries), args.profile)
    finally:
        if args.without_fits:
            aside.rename(fits)
    print(table)
    out = ROOT / "results" / f"query-latency-{datetime.date.today():%Y-%m-%d}.md"
    with out.open("a") as f:
        f.write(f"\n## {args.label}\n\n{table}\n" if args.label else f"\n{table}\n")


if __name__ == "__main__":
    main()
