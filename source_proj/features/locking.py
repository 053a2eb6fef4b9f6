"""One output lock for a group of cooperating ranks: rank 0 holds the output's lock (``source_proj.features.lock``)
for the run, the other ranks check that it is held for the same run before they write."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from source_proj.distributed.failures import together
from source_proj.distributed.group import ProcessGroup
from source_proj.distributed.work import agreed
from source_proj.features.lock import StoreLock, check_holder, hold_lock


@contextmanager
def group_lock(group: ProcessGroup, path: str | os.PathLike) -> Iterator[StoreLock | None]:
    """Hold the lock of ``path`` for the whole group for the ``with`` block (re-entrant, as
    ``hold_lock``). Yields rank 0's ``StoreLock`` there and None on the other ranks. A lock held
    by another run raises ``StoreLockedError`` on rank 0 and ``DistributedRunError`` naming
    rank 0 on every rank, before any rank writes."""
    if not group.distributed:
        with hold_lock(path) as lock:
            yield lock
        return
    with ExitStack() as stack:
        held: list[StoreLock | None] = [None]
        with together(group, f"locking {path}"):
            if group.is_main:
                held[0] = stack.enter_context(hold_lock(path))
        def main_run_id() -> str:
            lock = held[0]
            assert lock is not None, "agreed() calls this on rank 0, which holds the lock"
            return lock.run_id

        run_id = agreed(group, main_run_id)
        with together(group, f"joining the writers of {path}"):
            if not group.is_main:
                check_holder(path, run_id)
        yield held[0]
        group.barrier()  # rank 0 gives the lock back once every rank is done writing
