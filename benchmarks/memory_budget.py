"""Does a fit stay within ``max_gradient_memory`` (plus a stated overhead)?

    python benchmarks/memory_budget.py            # both parts, ~40 min on 2 shared cores
    python benchmarks/memory_budget.py --quick    # the 10M model only

Results: the table ``results/memory-budget-<date>.md`` and every measurement in the ``.json``
beside it (a run resumes from it: delete it to measure again).

Every measurement runs in a fresh process (its peak resident memory, VmHWM, is its own),
with one torch thread. After the model, its checkpoint and the data are loaded, the peak is
reset (``/proc/self/clear_refs``) and the resident size noted; the figure reported is the
peak during the work minus that resident size: what the work added.

* ``vmap`` check: the per-example gradients of B sequences at one checkpoint
  (``per_example_gradients``, ``torch.func`` ``vmap`` of ``grad``) against the prediction
  B x (p x 4 bytes of gradients + the activations ``gradients.memory.activation_cost``
  measures with plain autograd), with glibc's default allocator settings and with
  ``MALLOC_MMAP_THRESHOLD_=65536`` (freed blocks go back to the system at once, so RSS
  follows the live bytes): is the plain-autograd count what ``vmap`` holds?
* ``fit``: ``SourceAttributor.fit`` (curvature pass and features) of GPT-2 shapes of ~10M and
  ~30M parameters (``lm.SIZES``), byte vocabulary, 64 tokens, dense and factored projection,
  ``max_gradient_memory`` 0.5 GiB and 2 GiB; peak added against the budget.
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

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from lm import SIZES, TOKENS, gpt2, peak_rss  # noqa: E402  (a sibling script)

GIB = 2**30
BUDGETS = {"0.5GiB": GIB // 2, "2GiB": 2 * GIB}
ROWS = {"factored": 64, "dense": 8}  # dense: the projection to k of p floats per row is the slow part
PROJ_DIM = 256
VMAP_ROWS = (8, 16)
READING = "## Reading"


def resident() -> int:
    """This process's resident memory now (VmRSS), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> int:
    """Reset VmHWM to the current resident size (Linux) and return that size."""
    Path("/proc/self/clear_refs").write_text("5")
    return resident()


def setup(size: str, rows: int):
    """The model, its function, a one-checkpoint trajectory and ``rows`` sequences of token ids."""
    from source_proj.gradients.model import ModelFunction
    from source_proj.trajectory.checkpoints import Checkpoint, Trajectory

    torch.set_num_threads(1)
    model = gpt2(*SIZES[size], vocab=256, positions=TOKENS)
    ids = torch.randint(0, 256, (rows, TOKENS), generator=torch.Generator().manual_seed(0))
    trajectory = Trajectory((Checkpoint(model.state_dict(), steps=10, lr=0.1),))
    return model, ModelFunction.build(model, None, None), trajectory, ids


def vmap_check(size: str, batch: int) -> dict:
    """Peak added by the per-example gradients of ``batch`` sequences, and the prediction."""
    from source_proj.gradients.activations import activation_cost
    from source_proj.gradients.causal_lm import CausalLMTask
    from source_proj.gradients.per_example import loss_objective, per_example_gradients

    model, fn, _, ids = setup(size, batch)
    params, consts = fn.split_state(fn.canonical_state(model.state_dict(), "model"), torch.device("cpu"))
    task, inputs = CausalLMTask(), {"input_ids": ids}
    cost = activation_cost(fn, params, consts, task.loss, inputs, ids)
    base = reset_peak()
    grads = per_example_gradients(fn, params, consts, loss_objective(task.loss), inputs, ids)
    added = peak_rss() - base
    gradient_bytes = sum(g.numel() * g.element_size() for g in grads.values())
    return {"part": "vmap", "size": size, "batch": batch, "params": fn.num_params(), "added": added,
            "gradients": gradient_bytes, "activations": cost.of(batch), "per_example": cost.per_example,
            "malloc": os.environ.get("MALLOC_MMAP_THRESHOLD_", "default"), "load": os.getloadavg()[0]}


def fit(size: str, structure: str, budget: str) -> dict:
    """Peak added by a fit of ``ROWS[structure]`` sequences under ``budget``."""
    from source_proj.attributor import SourceAttributor
    from source_proj.gradients.causal_lm import CausalLMTask
    from source_proj.projection.projected import gradient_width

    model, _, trajectory, ids = setup(size, ROWS[structure])
    att = SourceAttributor(model, CausalLMTask(), trajectory, proj_dim=PROJ_DIM, num_segments=1,
                           proj_structure=structure, max_gradient_memory=BUDGETS[budget], progress=False)
    base = reset_peak()
    start = time.perf_counter()
    att.fit({"input_ids": ids})
    seconds = time.perf_counter() - start
    added = peak_rss() - base
    (cost,) = att.model_fn.runtime["activations"].values()
    width = gradient_width(att.projection, att.model_fn.num_params())
    batch = min(att.chunk_size, ROWS[structure])  # the largest batch the fit ran
    return {"part": "fit", "size": size, "structure": structure, "budget": budget, "rows": ROWS[structure],
            "params": att.model_fn.num_params(), "width": width, "chunk": att.chunk_size,
            "per_example": cost.per_example, "counted": 2 * batch * width * 4 + cost.of(batch), "added": added,
            "seconds": seconds, "malloc": os.environ.get("MALLOC_MMAP_THRESHOLD_", "default"),
            "load": os.getloadavg()[0]}


def run(args: list[str], env: dict[str, str]) -> dict:
    """One measurement in a fresh process (``env`` added to this one's environment)."""
    cmd = ["nice", "-n", "10", sys.executable, __file__, "_one", *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, **env})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(result, flush=True)
    return result


def malloc_name(result: dict) -> str:
    return "default" if result["malloc"] == "default" else f"mmap threshold {result['malloc']}"


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def write(results: list[dict], out: Path) -> None:
    """The markdown tables (rewritten after every measurement; a ``## Reading`` section after
    them is kept)."""
    loads = [r["load"] for r in results]
    lines = [
        f"# Memory budget: peak memory of a fit against max_gradient_memory, {datetime.date.today()}",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores (shared), "
        f"1-minute load average {min(loads):.1f}-{max(loads):.1f} during the runs, torch {torch.__version__}, "
        "one torch thread, CPU, float32. `python benchmarks/memory_budget.py`. 'added' = peak resident memory "
        "(VmHWM) during the work minus the resident memory after the model, checkpoint and data were loaded; "
        "each row is a fresh process.",
        "",
        "## Per-example gradients under vmap against the plain-autograd count",
        "",
        f"GPT-2 shapes (`lm.SIZES`), {TOKENS} tokens, byte vocabulary; `per_example_gradients` of B sequences "
        "at one checkpoint. Predicted = B x p x 4 (the gradients) + the activations `activation_cost` "
        "measures (forward, loss and create_graph backward, plain autograd).",
        "",
        "| model | params | malloc | B | activations / example | gradients | predicted | added | added / predicted |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in (r for r in results if r["part"] == "vmap"):
        predicted = r["gradients"] + r["activations"]
        lines.append(
            f"| {r['size']} | {r['params'] / 1e6:.1f}M | {malloc_name(r)} | {r['batch']} | {mib(r['per_example'])} | "
            f"{mib(r['gradients'])} | {mib(predicted)} | {mib(r['added'])} | {r['added'] / predicted:.2f} |"
        )
    lines += [
        "",
        "## Fits against the budget",
        "",
        f"`SourceAttributor.fit` (sampled curvature pass, then features) of the rows shown, one checkpoint, k = "
        f"{PROJ_DIM}. Counted = what the budget covers for the largest batch run, min(chunk, rows): 2 x batch x "
        "width x 4 (gradient buffers; width = p dense, the unfactored parameters + k factored) + the measured "
        "activations of the batch. Overhead = added - counted.",
        "",
        "| model | params | projection | malloc | budget | rows | chunk | activations / example | counted | added | "
        "added / budget | overhead | fit time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in (r for r in results if r["part"] == "fit"):
        lines.append(
            f"| {r['size']} | {r['params'] / 1e6:.1f}M | {r['structure']} | {malloc_name(r)} | {r['budget']} | {r['rows']} | {r['chunk']} | "
            f"{mib(r['per_example'])} | {mib(r['counted'])} | {mib(r['added'])} | "
            f"{r['added'] / BUDGETS[r['budget']]:.2f} | {mib(r['added'] - r['counted'])} | {r['seconds']:.0f} s |"
        )
    # A hand-written reading of the figures, below the tables, is kept when they are rewritten.
    reading = out.read_text().partition(READING)[2] if out.exists() else ""
    out.write_text("\n".join(lines) + "\n" + (f"\n{READING}{reading}" if reading else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", nargs="?", default="all", choices=["all", "_one"])
    parser.add_argument("args", nargs="*")
    parser.add_argument("--quick", action="store_true", help="the 10M model only")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / f"memory-budget-{datetime.date.today()}.md")
    args = parser.parse_args()
    if args.part == "_one":
        kind, *rest = args.args
        result = vmap_check(rest[0], int(rest[1])) if kind == "vmap" else fit(*rest)
        print(json.dumps(result))
        return
    sizes = ["10M"] if args.quick else ["10M", "30M"]
    mmap = {"MALLOC_MMAP_THRESHOLD_": "65536"}
    plan = [(["vmap", "10M", str(b)], malloc) for malloc in ({}, mmap) for b in VMAP_ROWS]
    plan += [(["fit", size, structure, budget], {}) for size in sizes for structure in ("factored", "dense")
             for budget in BUDGETS]
    plan += [(["fit", "10M", structure, "0.5GiB"], mmap) for structure in ("factored", "dense")]
    # Every result is kept in a JSON file next to the table: an interrupted run resumes there.
    raw = args.out.with_suffix(".json")
    done = json.loads(raw.read_text()) if raw.exists() else {}
    for task, env in plan:
        key = " ".join([*task, env.get("MALLOC_MMAP_THRESHOLD_", "default")])
        if key not in done:
            done[key] = run(task, env)
            raw.write_text(json.dumps(done, indent=1))
        write(list(done.values()), args.out)
    print(args.out.read_text())


if __name__ == "__main__":
    main()
