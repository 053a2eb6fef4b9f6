"""Run a function on W gloo processes (spawned, one thread each) and collect what each returns."""

from __future__ import annotations

import multiprocessing as mp
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from source_proj.distributed.group import distributed


def _entry(rank: int, world: int, rendezvous: str, fn: Callable, args: tuple, out: str, share: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        with distributed() if share else nullcontext():
            result: Any = {"ok": fn(*args)}
    except Exception as exc:  # noqa: BLE001 - handed back to the test
        result = {"error": exc, "traceback": traceback.format_exc()}
    finally:
        dist.destroy_process_group()
    torch.save(result, out)


def run_ranks(
    world: int, fn: Callable, args: tuple, workdir: Path, timeout: float = 180, share: bool = True
) -> list[dict]:
    """``fn(*args)`` on ranks 0..world-1 of a fresh gloo group, inside ``distributed()`` (the
    library shares its work among the ranks) unless ``share`` is False; each rank's
    {"ok": result} or {"error": exception, "traceback": text}, in rank order. ``fn`` must be
    importable."""
    workdir.mkdir(parents=True, exist_ok=True)
    rendezvous = workdir / f"rendezvous-{world}"
    rendezvous.unlink(missing_ok=True)
    ctx = mp.get_context("spawn")
    outs = [workdir / f"rank{r}-of-{world}.pt" for r in range(world)]
    procs = [ctx.Process(target=_entry, args=(r, world, str(rendezvous), fn, args, str(outs[r]), share)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    if alive:
        raise TimeoutError(f"{len(alive)} of {world} ranks still running after {timeout} s")
    return [torch.load(o, weights_only=False) for o in outs]
