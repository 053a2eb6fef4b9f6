"""The featurisation driver: compute every pending chunk of a feature store and write it,
resumably, optionally shared by the ranks of a distributed run.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from tqdm.auto import tqdm

from source_proj.distributed.failures import together
from source_proj.distributed.gather import merge_mappings
from source_proj.distributed.group import ProcessGroup
from source_proj.distributed.work import agreed, each_chunk
from source_proj.features.layout import ComputeChunk
from source_proj.features.locking import group_lock
from source_proj.features.store import FeatureStore


@dataclass(frozen=True)
class FeaturizeReport:
    """What one ``featurize`` call did.

    Attributes:
        computed_chunks: indices of the chunks computed and written by this call.
        skipped_chunks: number of chunks found complete (and intact) and left untouched.
        repaired_chunks: indices of the chunks found written but damaged (failing their
            digests), which this call recomputed (they are also in ``computed_chunks``).
    """

    computed_chunks: tuple[int, ...]
    skipped_chunks: int
    repaired_chunks: tuple[int, ...] = ()


def featurize(
    store: FeatureStore, compute_chunk: ComputeChunk, *, progress: bool = True, group: ProcessGroup | None = None
) -> FeaturizeReport:
    """Compute and write every pending chunk of ``store``, in order.

    ``compute_chunk(start, stop)`` returns the features of training rows [start, stop):
    an array (stop - start, D), or a ``ChunkFeatures`` when the store also keeps
    per-segment features or self-influence. Chunks already complete are checked against
    their digests and skipped without calling it (damaged ones are recomputed), so calling
    ``featurize`` again after an interruption (even SIGKILL) resumes where the earlier run
    stopped and, for a deterministic ``compute_chunk``, ends with the same store as an
    uninterrupted run.

    The store's lock (``source_proj.features.lock``) is held throughout: a second writer
    raises ``StoreLockedError`` naming this one. Each chunk is encoded and written by a
    background thread while the next one is computed; memory use is bounded by two chunks.
    A chunk is marked complete only once written, and on an exception the chunk being
    written is finished first.

    With a distributed ``group`` (``torch.distributed``; default: the current one) every rank
    calls this on the same store: rank 0 holds the lock for the group, the ranks share the
    digest checks and deal the pending chunks round-robin (``distributed.work.each_chunk``),
    so a rerun with any number of processes computes exactly the chunks still pending. The
    report lists the chunks computed by all ranks.
    """
    group = ProcessGroup.current() if group is None else group
    layout = store.layout
    show = progress and group.is_main
    with group_lock(group, store.path):
        with together(group, "checking the store's written chunks"):
            mine = store.damaged_chunks(group.strided(store.written_chunks()), progress=show)
        damaged = merge_mappings(group, mine)
        if group.is_main:
            store.reset_chunks(damaged)
        pending = agreed(group, store.pending_chunks)
        done_rows = layout.n_rows - sum(stop - start for start, stop in map(layout.chunk_range, pending))
        with (
            tqdm(total=layout.n_rows, initial=done_rows, unit="row", desc="featurize", disable=not show) as bar,
            ThreadPoolExecutor(max_workers=1) as writer,
        ):
            writing: list[Future] = []

            def work(index: int) -> None:
                chunk = store.check_chunk(index, compute_chunk(*layout.chunk_range(index)))
                if writing:
                    writing.pop().result()
                writing.append(writer.submit(store._write_checked, index, chunk))

            def finish() -> None:
                if writing:
                    writing.pop().result()

            def advance(batch: Sequence[int]) -> None:
                bar.update(sum(stop - start for start, stop in map(layout.chunk_range, batch)))

            each_chunk(group, pending, work, "featurisation", advance)
            with together(group, "featurisation"):
                finish()
    return FeaturizeReport(tuple(pending), layout.n_chunks - len(pending), tuple(sorted(damaged)))

