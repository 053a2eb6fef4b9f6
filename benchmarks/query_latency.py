"""Latency of one query against a fitted feature store, by phase, against its floor.

Setup (``setup``, not timed): a GPT-2 built from a config (``--size``, shapes of
``benchmarks/lm.py``'s SIZES, byte vocabulary, 64 tokens; ``proj_structure="auto"``: the
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
  (interpreter start to exit), and ``import torch`` alone, in its own fresh process.

The goal (issue #27): the whole one-query ``topk`` at most 1.5 x (query gradients + search).

Usage: ``python benchmarks/query_latency.py [--size 10M] [--repeats 3] [--workdir DIR]
[--profile FILE] [--without-fits] [--label TEXT]`` (``--profile`` writes a cProfile of one ``api``
run; ``--without-fits`` sets the store's rank-one fits of D^{1/2} aside, as before the fit kept them).
"""

from __future__ import annotations

import argparse
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
    settings = {"proj_dim": 1024, "proj_structure": "auto", "num_segments": min(3, n_checkpoints)}
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


def floor(work: Path) -> dict:
    """The bare query gradients and the bare search, each timed alone (no checks, no digests)."""
    import torch

    from source_proj.features.store import FeatureStore
    from source_proj.gradients.data import as_examples
    from source_proj.projection.kronecker import FactoredProjection
    from source_proj.projection.projected import projected_gradients
    from source_proj.retrieval.exact import exact_proponents_opponents

    spec = _spec(work)
    store_path = work / "store.zarr"
    att = spec.attributor(_config(store_path))
    model_fn, traj = att.model_fn, att.trajectory
    inputs, targets = as_examples(spec.queries, "queries").rows(0, 1, att.device)
    groups = att.query_form.query_checkpoints(att.segments, len(traj.checkpoints))
    t0 = time.perf_counter()
    parts, fitting = [], 0.0
    for group in groups:
        states = []
        for c in group:
            params, consts = model_fn.split_state(model_fn.canonical_state(traj.checkpoints[c].load(), f"checkpoint {c}"),
                                                  att.device)
            scale = att.preconditioner.sqrt_scale(c)
            if isinstance(att.projection, FactoredProjection) and scale is not None:
                t = time.perf_counter()
                scale = att.projection.fit_scale(scale)  # prepared once by the fit (FITS_FILE)
                fitting += time.perf_counter() - t
            states.append((params, consts, f"checkpoint {c}", scale))
        parts.append(projected_gradients(model_fn, states, att.task.measurement, inputs, targets, att.projection_at(group[0])))
    gradients = time.perf_counter() - t0 - fitting
    q = torch.cat(parts, dim=1).numpy()
    store = FeatureStore.open(store_path)
    t0 = time.perf_counter()
    exact_proponents_opponents(store, q, K, progress=False)
    search = time.perf_counter() - t0
    return {"query gradients": gradients, "search": search, "rank-one fits": fitting}


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
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _timed_command(command: list[str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system) of ``command`` in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    before = os.times()
    t = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    wall = time.perf_counter() - t
    after = os.times()
    if done.returncode != 0:
        raise RuntimeError(f"{command} failed: {done.stderr.decode()[-2000:]}")
    return wall, (after.children_user - before.children_user) + (after.children_system - before.children_system)


def cli(work: Path) -> dict:
    command = [sys.executable, "-m", "source_proj.cli.main", "topk", "--task", f"{work / 'task.py'}:task",
               "--store", str(work / "store.zarr"), "-k", str(K), "--quiet", "--output", str(work / "topk.csv")]
    wall, cpu = _timed_command(command)
    import_wall, import_cpu = _timed_command([sys.executable, "-c", "import torch"])
    model_wall, _ = _timed_command([sys.executable, "-c", "import torch; from transformers import GPT2Config, GPT2LMHeadModel"])
    return {"whole command": wall, "whole command, CPU": cpu, "import torch": import_wall, "import torch, CPU": import_cpu,
            MODEL_IMPORT: model_wall}


def _stats(runs: list[dict]) -> dict[str, tuple[float, float]]:
    return {key: (statistics.median(r[key] for r in runs), min(r[key] for r in runs)) for key in runs[0]}


def report(work: Path, size: str, repeats: int, profile: str | None) -> str:
    import torch

    floors, apis, clis = [], [], []
    for i in range(repeats):
        floors.append(_fresh(["--measure", "floor", "--workdir", str(work)]))
        apis.append(_fresh(["--measure", "api", "--workdir", str(work),
                            *(["--profile", profile] if profile and i == 0 else [])]))
        clis.append(cli(work))
    f, a, c = _stats(floors), _stats(apis), _stats(clis)
    goal = 1.5 * (f["query gradients"][0] + f["search"][0])
    api_total = a["total"][0]
    cli_total = c["whole command"][0]
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
                         ("not in the floor: rank-one fits of D^1/2", f["rank-one fits"])):
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
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="10M", choices=sorted(SIZES))
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="AdamW steps between checkpoints")
    parser.add_argument("--repeats", type=int, default=3)
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
        table = report(work, args.size, args.repeats, args.profile)
    finally:
        if args.without_fits:
            aside.rename(fits)
    print(table)
    out = ROOT / "results" / f"query-latency-{datetime.date.today():%Y-%m-%d}.md"
    with out.open("a") as f:
        f.write(f"\n## {args.label}\n\n{table}\n" if args.label else f"\n{table}\n")


if __name__ == "__main__":
    main()
