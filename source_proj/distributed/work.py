"""Chunked work shared by the ranks: one list of chunks everyone agrees on, dealt round-robin
and done in lockstep rounds so that a failure anywhere stops every rank after the round."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch.distributed as dist

from source_proj.distributed.failures import together
from source_proj.distributed.group import ProcessGroup

T = TypeVar("T")


def agreed(group: ProcessGroup, value: Callable[[], T]) -> T:
    """``value()`` computed on rank 0 and handed to every rank (pickled), e.g. the pending
    chunks of an output, so that all ranks act on one view of it."""
    if not group.distributed:
        return value()
    box: list[Any] = [None]
    with together(group, "agreeing on the work"):
        if group.is_main:
            box[0] = value()
    dist.broadcast_object_list(box, src=0)
    return box[0]


def each_chunk(
    group: ProcessGroup,
    chunks: Sequence[int],
    work: Callable[[int], None],
    what: str,
    after_round: Callable[[Sequence[int]], None] | None = None,
) -> None:
    """Call ``work(chunk)`` for this rank's share of ``chunks`` (the same list on every rank):
    round j gives chunks[j W + r] to rank r. After each round every rank learns whether any
    rank failed (``DistributedRunError`` naming it, raised everywhere) and
    ``after_round(chunks of the round)`` runs (e.g. a progress bar). Any rank may thus own any
    chunk: a rerun with another number of processes just deals the chunks still pending."""
    size = group.world_size
    for first in range(0, len(chunks), size):
        batch = chunks[first : first + size]
        with together(group, what):
            if group.rank < len(batch):
                work(batch[group.rank])
        if after_round is not None:
            after_round(batch)
