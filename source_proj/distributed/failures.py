"""Failures that stop every rank, with the failing rank named, instead of leaving the others
waiting forever on their next collective."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist

from source_proj.distributed.group import ProcessGroup
from source_proj.errors import SourceProjError


class DistributedRunError(SourceProjError, RuntimeError):
    """Work failed on one or more ranks of a distributed run (raised on every rank).

    Attributes:
        failures: (rank, "ExceptionType: message") of each rank that failed, in rank order.
    """

    def __init__(self, what: str, failures: list[tuple[int, str]]) -> None:
        self.what, self.failures = what, failures
        detail = "; ".join(f"rank {rank}: {message}" for rank, message in failures)
        super().__init__(f"{what} failed on rank{'s' if len(failures) > 1 else ''} "
                         f"{', '.join(str(r) for r, _ in failures)}: {detail}")

    def __reduce__(self) -> tuple:
        return type(self), (self.what, self.failures)


@contextmanager
def together(group: ProcessGroup, what: str) -> Iterator[None]:
    """Run the block on every rank and then compare notes: if it raised anywhere, every rank
    raises ``DistributedRunError`` naming the failing ranks and their errors.

    The block must not itself wait on other ranks after it may have raised (the exchange here
    is the only collective that every rank is sure to reach). A single process re-raises the
    original exception unchanged.
    """
    error: BaseException | None = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - reported to every rank below
        if not group.distributed:
            raise
        error = exc
    if not group.distributed:
        return
    statuses: list[str | None] = [None] * group.world_size
    dist.all_gather_object(statuses, None if error is None else f"{type(error).__name__}: {error}")
    failed = [(rank, message) for rank, message in enumerate(statuses) if message is not None]
    if failed:
        raise DistributedRunError(what, failed) from error
