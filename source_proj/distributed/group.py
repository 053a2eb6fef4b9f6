"""This process's place in a distributed run, and the work it owns.

The library shares its work among ranks only when asked: inside :func:`distributed` (which the
command line enters under ``torchrun``), or through an explicit ``group`` argument. A program
that has initialised ``torch.distributed`` for its own reasons (a Trainer, accelerate, DDP) and
calls the library on one rank gets a single process, and no collective that would wait for the
other ranks. Outside such a block every function here describes a single process (rank 0 of 1),
so the same code path serves one process and many.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ProcessGroup:
    """The default ``torch.distributed`` process group as seen by this process.

    Attributes:
        rank: this process's rank, in [0, world_size).
        world_size: the number of processes (1 without a process group).
    """

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> ProcessGroup:
        """The group the library shares its work with: the one of the innermost
        :func:`distributed` block, or a single process outside one."""
        return _active[-1] if _active else cls()

    @classmethod
    def initialised(cls) -> ProcessGroup:
        """The initialised default ``torch.distributed`` process group, or a single process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the one that creates outputs and shows progress)."""
        return self.rank == 0

    @property
    def collective_device(self) -> torch.device:
        """Where tensors must be for this group's collectives: this rank's GPU under NCCL,
        else the CPU."""
        if self.distributed and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def span(self, n: int) -> range:
        """This rank's contiguous share of ``range(n)``: ranks get [r n / W, (r + 1) n / W),
        sizes differing by at most one, in rank order."""
        return range(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)

    def strided(self, items: list) -> list:
        """This rank's share of ``items`` when they are dealt round-robin (items[r::W])."""
        return items[self.rank :: self.world_size]

    def barrier(self) -> None:
        """Wait for every rank (nothing to do for a single process)."""
        if self.distributed:
            dist.barrier()


# The groups of the open ``distributed`` blocks, innermost last (shared by all threads: the
# library's worker threads belong to the run of the thread that started them).
_active: list[ProcessGroup] = []


@contextmanager
def distributed(group: ProcessGroup | None = None) -> Iterator[ProcessGroup]:
    """Within the block, the library shares its work (featurisation, curvature, search, score
    blocks) among the ranks of ``group``, by default the initialised ``torch.distributed``
    group; every rank must then make the same library calls. Yields the group."""
    group = ProcessGroup.initialised() if group is None else group
    if group.distributed and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"a group of {group.world_size} ranks needs torch.distributed initialised first")
    _active.append(group)
    try:
        yield group
    finally:
        _active.pop()


def init_from_environment(device: str | None = None) -> ProcessGroup:
    """Join the run that ``torchrun`` describes in the environment (``WORLD_SIZE``, ``RANK``,
    ``MASTER_ADDR``, ...), if any and not joined yet; returns the process group.

    The backend is NCCL when the work runs on CUDA (each rank on ``cuda:LOCAL_RANK``), else
    gloo. Without ``WORLD_SIZE`` > 1 in the environment nothing is initialised.
    """
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return ProcessGroup.initialised()
    on_cuda = device is not None and device.startswith("cuda") or device is None and torch.cuda.is_available()
    if on_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if on_cuda else "gloo")
    return ProcessGroup.initialised()


def rank_device(device: str | None) -> str | None:
    """The device this rank computes on: ``cuda:LOCAL_RANK`` when ``device`` is "cuda" under
    torchrun (one GPU per rank), else ``device`` unchanged."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device
