"""Curvature pass vs feature pass per row, and checkpoint reads per pass (issue #27).

A GPT-2 language model built from a config (4 layers, width 128, vocabulary 1024: 0.93M
parameters; nothing downloaded), sequences of 64 tokens, sampled curvature, dense and factored
projections. Two measurements, each made for the code before the change (``--before``, a
commit: its ``source_proj`` is exported with ``git archive`` and imported instead of this
tree's) and after it (``--after``, a commit, or by default this tree), in child processes run
in interleaved rounds, each structure's timings and the reads in a fresh process of their own:

* CPU time per row (``time.process_time`` of a one-thread process: other processes on shared
  cores barely move it, wall time does) of the curvature pass at one checkpoint
  (``checkpoint_hessian``) and of the feature pass (``featurize_range``, one checkpoint, so one
  gradient and one projection per row in both), measured alternately, their ratio per
  repeat, and within the curvature pass the forwards of whole batches
  (``ModelFunction.forward`` with B > 1) and the pseudo-label draws (``torch.multinomial``
  before, ``Tensor.exponential_`` after: the same random numbers), and the process's peak
  resident memory (VmHWM, ``lm.peak_rss``) at the end of its repeats;
* reads of each checkpoint file (``load_state_file``) during construction, an in-memory fit,
  a set of queries and a fit into a feature store, with 3 checkpoint files and 4 chunks of rows.

    python benchmarks/curvature_pass.py --before <commit> --after <commit> \
        --out benchmarks/results/curvature-pass-2026-12-06.md
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STRUCTURES = ("dense", "factored")
TOKENS, VOCAB, ROWS, CHUNK = 64, 1024, 32, 8


def _model():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=TOKENS, n_embd=128, n_layer=4, n_head=4, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    import torch

    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


def _rows(n: int, seed: int) -> dict:
    import torch

    ids = torch.randint(0, VOCAB, (n, TOKENS), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}


def _trajectory(model, folder: Path | None, count: int):
    """``count`` checkpoints: the model's weights and small perturbations of them (files in
    ``folder`` if given)."""
    import torch

    from source_proj.trajectory.checkpoints import Checkpoint, Trajectory

    gen = torch.Generator().manual_seed(1)
    weights = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to the embedding
    checkpoints = []
    for i in range(count):
        state = {k: v + 0.01 * i * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                 for k, v in weights.items()}
        if folder is not None:
            torch.save(state, folder / f"ckpt{i}.pt")
            state = folder / f"ckpt{i}.pt"
        checkpoints.append(Checkpoint(state, steps=10, lr=0.1))
    return Trajectory(tuple(checkpoints))


def _timings(structure: str, repeats: int, proj_dim: int) -> dict:
    """CPU seconds per row of the curvature and feature passes (each repeat) and of the batch
    forwards and pseudo-label draws inside the curvature pass."""
    import torch

    from source_proj.attributor import SourceAttributor
    from source_proj.gradients.causal_lm import CausalLMTask
    from source_proj.gradients.data import as_examples
    from source_proj.gradients.model import ModelFunction

    model = _model()
    attributor = SourceAttributor(model, CausalLMTask(reduction="mean"), _trajectory(model, None, 1), proj_dim=proj_dim,
                                  num_segments=1, curvature="sampled", chunk_size=CHUNK, query_mode="final",
                                  proj_structure=structure, progress=False)
    examples = as_examples(_rows(ROWS, 0))
    attributor.prepare(examples)  # warms up (taps, projection) and sets the operators
    forward, multinomial, exponential = ModelFunction.forward, torch.multinomial, torch.Tensor.exponential_
    spent = {"batch_forward": 0.0, "draws": 0.0}

    def timed(what, call, *args, **kwargs):
        start = time.process_time()
        out = call(*args, **kwargs)
        if what != "batch_forward" or out.shape[0] > 1:
            spent[what] += time.process_time() - start
        return out

    ModelFunction.forward = lambda self, *args: timed("batch_forward", forward, self, *args)
    torch.multinomial = lambda *args, **kwargs: timed("draws", multinomial, *args, **kwargs)
    torch.Tensor.exponential_ = lambda self, *args, **kwargs: timed("draws", exponential, self, *args, **kwargs)
    out: dict = {"curvature": [], "features": [], "batch_forward": [], "draws": []}
    try:
        for _ in range(repeats):
            spent.update(batch_forward=0.0, draws=0.0)
            start = time.process_time()
            attributor.checkpoint_hessian(0, examples)
            out["curvature"].append((time.process_time() - start) / ROWS)
            for what, seconds in spent.items():
                out[what].append(seconds / ROWS)
            start = time.process_time()
            attributor.featurize_range(examples, 0, ROWS)
            out["features"].append((time.process_time() - start) / ROWS)
    finally:
        ModelFunction.forward, torch.multinomial, torch.Tensor.exponential_ = forward, multinomial, exponential
    return out


def _reads() -> dict:
    """Reads of each checkpoint file per phase: name -> {file: count}."""
    import source_proj.trajectory.checkpoints as checkpoints
    from source_proj.attributor import SourceAttributor
    from source_proj.gradients.causal_lm import CausalLMTask

    counts: collections.Counter = collections.Counter()
    load = checkpoints.load_state_file

    def counted(path):
        counts[Path(path).name] += 1
        return load(path)

    checkpoints.load_state_file = counted
    phases = {}
    with tempfile.TemporaryDirectory() as folder:
        model = _model()
        trajectory = _trajectory(model, Path(folder), 3)
        settings = dict(proj_dim=256, num_segments=3, curvature="sampled", chunk_size=CHUNK, query_mode="segment",
                        proj_structure="factored", progress=False)

        def phase(name, action):
            counts.clear()
            result = action()
            phases[name] = dict(sorted(counts.items()))
            return result

        task = CausalLMTask(reduction="mean")
        attributor = phase("construction", lambda: SourceAttributor(model, task, trajectory, **settings))
        phase(f"fit in memory ({ROWS} rows, {ROWS // CHUNK} chunks)", lambda: attributor.fit(_rows(ROWS, 0)))
        phase(f"queries ({ROWS // 2} rows, {ROWS // 2 // CHUNK} chunks)", lambda: attributor.query_features(_rows(ROWS // 2, 1)))
        store = SourceAttributor(model, task, trajectory, **settings)
        phase(f"fit into a store ({ROWS // CHUNK} store chunks)",
              lambda: store.fit(_rows(ROWS, 0), store=Path(folder) / "s.zarr", chunk_rows=CHUNK))
    checkpoints.load_state_file = load
    return phases


def child(what: str, repeats: int, proj_dim: int) -> None:
    """One measurement of one side, as JSON on stdout: ``what`` is a structure (its timings and
    this process's peak resident memory, bytes, at their end) or "reads"."""
    import torch
    from lm import peak_rss  # a sibling script (this script's folder is on sys.path)

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    result = _reads() if what == "reads" else {**_timings(what, repeats, proj_dim), "peak": peak_rss()}
    print(json.dumps(result))


def _export(commit: str, folder: Path) -> None:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "source_proj", "kernels"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)


def _run_side(source: Path | None, what: str, repeats: int, proj_dim: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if source is not None:  # the exported tree comes before the editable install on sys.path
        env["PYTHONPATH"] = str(source)
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", what, "--repeats", str(repeats),
                           "--proj-dim", str(proj_dim)],
                          env=env, check=True, capture_output=True, text=True, cwd=tempfile.gettempdir())
    return json.loads(done.stdout.strip().splitlines()[-1])


def _machine() -> str:
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} (1 thread)"


def _report(sides: dict[str, dict], commits: tuple[str, str], loads: tuple[float, float], proj_dim: int) -> str:
    date = datetime.date.today().isoformat()
    lines = [
        f"# Curvature pass vs feature pass, and checkpoint reads per pass, {date}",
        "",
        f"Machine: {_machine()}. Load average (1 min) at start / end: {loads[0]:.1f} / {loads[1]:.1f}.",
        f"Model: GPT-2 from a config (4 layers, width 128, vocabulary {VOCAB}: 0.93M parameters), {TOKENS} tokens "
        f"per row, {ROWS} rows in chunks of {CHUNK}, k = {proj_dim}, sampled curvature, one checkpoint.",
        f"Before: {commits[0]}; after: {commits[1]} (commits exported with git archive). Child processes in "
        "interleaved rounds; CPU seconds of the one-thread process per row, median (min) over all repeats of "
        "all rounds; the ratio is the median (range) of each repeat's curvature / feature pass, measured one "
        "after the other. Each structure's rounds run in fresh processes; peak RSS is the largest over its "
        "rounds of the process's peak resident memory (VmHWM) at the end of its repeats (Python, torch, "
        "transformers and the model included).",
        "",
        "## CPU time per row (ms)",
        "",
        "| structure | code | curvature pass | of which batch forwards | of which label draws | feature pass "
        "| curvature / features | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for structure in STRUCTURES:
        for side, measured in sides.items():
            results = measured["timings"][structure]
            merged = {key: [v for r in results for v in r[key]]
                      for key in ("curvature", "features", "batch_forward", "draws")}
            med = {key: 1e3 * statistics.median(v) for key, v in merged.items()}
            low = {key: 1e3 * min(v) for key, v in merged.items()}
            ratios = [c / f for c, f in zip(merged["curvature"], merged["features"])]
            lines.append(
                f"| {structure} | {side} | {med['curvature']:.2f} ({low['curvature']:.2f}) | "
                f"{med['batch_forward']:.2f} | {med['draws']:.2f} | {med['features']:.2f} ({low['features']:.2f}) | "
                f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | "
                f"{max(r['peak'] for r in results) / 2**20:.0f} |"
            )
    lines += ["", "## Reads of each checkpoint file (3 files)", "", "| phase | before | after |", "|---|---|---|"]
    before, after = sides["before"]["reads"], sides["after"]["reads"]
    for phase in after:
        def shown(found: dict) -> str:
            return ", ".join(f"{name}: {count}" for name, count in found.items()) or "none"

        lines.append(f"| {phase} | {shown(before.get(phase, {}))} | {shown(after[phase])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="commit of the code before the change")
    parser.add_argument("--after", help="commit of the code after it (default: this tree)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--proj-dim", type=int, default=256)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", choices=(*STRUCTURES, "reads"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.repeats, args.proj_dim)
        return
    if args.before is None:
        parser.error("--before <commit> is needed")
    start_load = os.getloadavg()[0]
    sides: dict[str, dict] = {side: {"timings": {s: [] for s in STRUCTURES}} for side in ("before", "after")}
    with tempfile.TemporaryDirectory() as before, tempfile.TemporaryDirectory() as after:
        _export(args.before, Path(before))
        if args.after is not None:
            _export(args.after, Path(after))
        sources = {"before": Path(before), "after": None if args.after is None else Path(after)}
        for _ in range(args.rounds):
            for structure in STRUCTURES:
                for side, source in sources.items():
                    sides[side]["timings"][structure].append(_run_side(source, structure, args.repeats, args.proj_dim))
        for side, source in sources.items():
            sides[side]["reads"] = _run_side(source, "reads", args.repeats, args.proj_dim)
    text = _report(sides, (args.before, args.after or "this tree"), (start_load, os.getloadavg()[0]), args.proj_dim)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
