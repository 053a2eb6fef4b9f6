"""Start-up of a one-query ``source-proj topk`` against a fitted store, by phase.

Setup (not timed): a tiny GPT-2 trained by ``transformers.Trainer`` for a few steps with a
word-level tokenizer saved beside it (nothing downloaded), training and query rows as JSON
lines, and a feature store fitted by ``source-proj fit --run``. Then, each in a fresh Python
process, ``--repeats`` times (median, min):

* ``imports + parser``: importing ``source_proj.cli.main`` and parsing the command line;
* ``build the run``: the task of ``--run`` (transformers, model from its config, tokenizer,
  trajectory, the data files tokenised);
* ``store + query features``: the store opened and checked, the query's gradient features;
* ``search``: the exact top-k search;
* ``whole command``: the wall time of ``python -m source_proj.cli.main topk ...`` (interpreter
  start and exit included), and its CPU time (user + system; less sensitive to other load);
* ``curation import after torch``: what building the parser cost when it imported
  ``source_proj.curation`` (for ``curate --rank-by``'s choices), beyond the torch import every
  command makes anyway.

Each row also gives the largest over the repeats of its process's peak resident memory (VmHWM,
``lm.peak_rss``, read after the timings; the four phases run in one process and share its
figure; for the whole command, ``os.wait4``'s ``ru_maxrss``, the same high-water mark, since the
command runs unmodified).

``python -X importtime`` of the parse step gives the modules that cost most to import. The
table is appended, under ``--label`` (e.g. "before" / "after" a change), with the machine's
load, to ``benchmarks/results/cli-startup-<date>.md``.

Usage: ``python benchmarks/cli_startup.py --label after [--repeats 5] [--workdir DIR]``.
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

WORDS = "abcdefghij"
PHASES = ("imports + parser", "build the run", "store + query features", "search")
# imported after the timings: lm (a sibling script) imports torch at its top
_PEAK_RSS = f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); from lm import peak_rss"
_CURATION_IMPORT = (
    "import json, time, torch; t = time.perf_counter(); import source_proj.curation; dt = time.perf_counter() - t; "
    f"{_PEAK_RSS}; print(json.dumps([dt, peak_rss()]))"
)
_DRIVER = f"""
import json, sys, time
t0 = time.perf_counter()
from source_proj.cli.main import build_parser
args = build_parser().parse_args(sys.argv[1:])
t1 = time.perf_counter()
from source_proj.cli import commands
spec = commands._load_spec(args)
t2 = time.perf_counter()
store, attributor = commands._store_attributor(args, spec)
queries = attributor.query_features(spec.queries).numpy()
t3 = time.perf_counter()
commands._exact_results(args, store, queries, None, ["proponents", "opponents"])
t4 = time.perf_counter()
{_PEAK_RSS}
print(json.dumps([t1 - t0, t2 - t1, t3 - t2, t4 - t3, peak_rss()]))
"""


def _setup(work: Path) -> list[str]:
    """Train the run, write the data files, fit the store; the topk arguments."""
    import datasets
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        PreTrainedTokenizerFast,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    from source_proj.cli.main import main

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    gen = torch.Generator().manual_seed(0)
    train = torch.randint(0, 10, (64, 12), generator=gen).tolist()
    if not (work / "run").exists():
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=10, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0,
                            eos_token_id=0)
        args = TrainingArguments(output_dir=str(work / "run"), per_device_train_batch_size=8, max_steps=8,
                                 save_steps=4, report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
        Trainer(model=GPT2LMHeadModel(config), args=args, processing_class=PreTrainedTokenizerFast(tokenizer_object=tok),
                train_dataset=datasets.Dataset.from_dict({"input_ids": train, "labels": train}),
                data_collator=default_data_collator).train()
    for name, rows in (("train", train), ("queries", train[:1])):
        (work / f"{name}.jsonl").write_text("".join(json.dumps({"text": " ".join(WORDS[t] for t in r)}) + "\n"
                                                    for r in rows))
    files = ["--run", str(work / "run"), "--train", str(work / "train.jsonl"), "--store", str(work / "feats.zarr"),
             "--quiet"]
    if not (work / "feats.zarr").exists():
        assert main(["fit", *files, "--proj-dim", "64", "--num-segments", "2"]) == 0
    return ["topk", *files, "--queries", str(work / "queries.jsonl"), "-k", "5"]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=True, capture_output=True, text=True)


def _whole_command(argv: list[str]) -> tuple[float, int]:
    """Wall seconds and peak resident memory (bytes, the kernel's ``ru_maxrss`` of the child) of
    ``python -m source_proj.cli.main`` with ``argv``."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "source_proj.cli.main", *argv], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise subprocess.CalledProcessError(child.returncode, child.args)
    return wall, usage.ru_maxrss * 1024


def _import_costs(argv: list[str], top: int = 8) -> list[tuple[str, float]]:
    """The ``top`` modules with the largest cumulative import time (s) of the parse step."""
    code = "import sys; from source_proj.cli.main import build_parser; build_parser().parse_args(sys.argv[1:])"
    err = _run([sys.executable, "-X", "importtime", "-c", code, *argv]).stderr
    costs = {}
    for line in err.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cumulative, name = line[len("import time:"):].split("|")
            if cumulative.strip().isdigit():
                costs[name.strip()] = int(cumulative) / 1e6
    return sorted(costs.items(), key=lambda item: -item[1])[:top]


def main() -> None:
    """Set up, time the phases and append the table to the results file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", required=True, help="what this run measures, e.g. before / after")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", help="keep the run and store here (default: a temporary folder)")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cli-startup-"))
    work.mkdir(parents=True, exist_ok=True)
    argv = _setup(work)
    phases, whole, cpu, curation, peaks = [], [], [], [], {"driver": [], "whole": [], "curation": []}
    for _ in range(args.repeats):
        *times, peak = json.loads(_run([sys.executable, "-c", _DRIVER, *argv]).stdout.strip().splitlines()[-1])
        phases.append(times)
        peaks["driver"].append(peak)
        before = os.times()
        wall, peak = _whole_command(argv)
        whole.append(wall)
        peaks["whole"].append(peak)
        after = os.times()
        cpu.append(after.children_user + after.children_system - before.children_user - before.children_system)
        seconds, peak = json.loads(_run([sys.executable, "-c", _CURATION_IMPORT]).stdout)
        curation.append(seconds)
        peaks["curation"].append(peak)
    rows = [(name, [p[i] for p in phases], peaks["driver"]) for i, name in enumerate(PHASES)] + [
        ("whole command", whole, peaks["whole"]), ("whole command, CPU time", cpu, peaks["whole"]),
        ("curation import after torch", curation, peaks["curation"])]
    lines = [f"\n## {args.label}\n", f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.machine()}, "
             f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, {args.repeats} repeats\n",
             "peak RSS: the largest over the repeats of the peak resident memory (VmHWM) of the row's process; "
             "the four phases run in one process and share its figure.\n",
             "| phase | median (s) | min (s) | peak RSS (MiB) |", "|---|---|---|---|"]
    lines += [f"| {name} | {statistics.median(t):.2f} | {min(t):.2f} | {max(peak) / 2**20:.0f} |"
              for name, t, peak in rows]
    lines += ["", "largest cumulative imports of the parse step (`python -X importtime`):", "",
              "| module | s |", "|---|---|"]
    lines += [f"| {name} | {seconds:.2f} |" for name, seconds in _import_costs(argv)]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).parent / "results" / f"cli-startup-{datetime.date.today():%Y-%m-%d}.md"
    if not out.exists():
        out.write_text("# Start-up of a one-query `source-proj topk --run` (benchmarks/cli_startup.py)\n")
    with open(out, "a") as handle:
        handle.write(text)


if __name__ == "__main__":
    main()
