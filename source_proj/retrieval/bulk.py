"""Bulk scoring: the full score matrix and self-influence, written to zarr block by block.

Both walk the feature store one chunk of training rows at a time and write their results to
a zarr v3 group with a completion ledger (``source_proj.features.ledger``), so memory is bounded by a
block (never n_query x N or N x D) and a run that is interrupted, even by SIGKILL, resumes
where it stopped when called again with the same arguments. Each run holds the lock of its
output (``source_proj.features.lock``): a second run on the same output is refused.

- ``score_matrix``: ``scores[q, m] = Q[q] . F[m]`` for all queries and training rows,
  float32 (n_query, N), in the group's array ``scores``.
- ``self_influence``: ``self_influence[m] = Qself[m] . F[m]``, float64 (N,), where
  ``Qself[m]`` is training example m's own query features (its measurement's projected
  gradient, as for any query), supplied chunk by chunk. Large values flag examples that
  strongly support their own prediction: candidates for mislabeled or outlying data.

Each ledger entry holds the digests of the values written (one per zarr chunk of the row
chunk: per query block for the scores), so a chunk file deleted (it would read as zeros),
truncated or changed after its run is found: a rerun with the same arguments checks every
written chunk first and recomputes the damaged ones (``on_damaged`` hears of them), and
``check_output`` lists them without writing. Score outputs of the older layout, whose ledger
digested each block's bounds instead of its values, cannot be checked and are refused
(``OldOutputError``); their ``scores`` array stays readable with zarr.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm

from source_proj.distributed.failures import together
from source_proj.distributed.gather import merge_mappings
from source_proj.distributed.group import ProcessGroup
from source_proj.distributed.work import agreed, each_chunk
from source_proj.errors import InputError
from source_proj.features.errors import StoreCorruptError, StoreError, StoreMismatchError
from source_proj.features.ledger import (
    ChunkLedger,
    array_digest,
    chunk_digest,
    create_group_atomically,
    group_array,
)
from source_proj.features.locking import group_lock
from source_proj.features.store import FeatureStore
from source_proj.retrieval.exact import check_queries

ATTRS_KEY = "source_proj_bulk"
# Marks score outputs whose ledger digests the values (absent from the older layout).
LEDGER_KEY = "ledger"
VALUE_DIGESTS = "value digests per query block"
# The array each kind of output holds.
ARRAYS = {"score_matrix": "scores", "self_influence": "self_influence"}
SelfQueryChunk = Callable[[int, int], np.ndarray]
OnDamaged = Callable[[dict[int, str]], None]


class OldOutputError(StoreError):
    """A bulk output written in an older layout that cannot be checked or resumed."""


@dataclass(frozen=True)
class OutputCheck:
    """What ``check_output`` found in a bulk output.

    Attributes:
        path: the output directory.
        array: the name of its array ("scores" or "self_influence").
        n_chunks: its number of row chunks.
        pending: row chunks not written yet.
        damaged: row chunk -> what is wrong, for the written chunks whose values fail their
            digests (empty when every written chunk is intact).
    """

    path: Path
    array: str
    n_chunks: int
    pending: list[int]
    damaged: dict[int, str]


def _parts(array: zarr.Array, index: int) -> list[tuple[tuple[slice, ...], str]]:
    """The zarr chunks holding row chunk ``index`` of a bulk output array (training rows on
    its last axis), one per ledger part: (selection, chunk file relative to the array)."""
    rows = array.chunks[-1]
    columns = slice(index * rows, min((index + 1) * rows, array.shape[-1]))
    if array.ndim == 1:
        return [((columns,), f"c/{index}")]
    block = array.chunks[0]
    return [
        ((slice(q0, min(q0 + block, array.shape[0])), columns), f"c/{q0 // block}/{index}")
        for q0 in range(0, array.shape[0], block)
    ]


def _damaged(path: Path, array: zarr.Array, ledger: ChunkLedger, chunks: Collection[int]) -> dict[int, str]:
    """``{chunk: problem}`` for the chunks among ``chunks`` (written ones) whose stored
    values are unreadable or fail the ledger's digests. Reads one zarr chunk at a time."""
    damaged = {}
    for index in chunks:
        expected = ledger.digests(index, index + 1)[0]
        for part, (selection, name) in enumerate(_parts(array, index)):
            file = path / array.path / name
            try:
                ok = array_digest(np.asarray(array[selection])) == int(expected[part])
            except ValueError:  # zarr: a truncated chunk file does not reshape
                ok = False
            if not ok:
                problem = "is missing (it would read as zeros)" if not file.exists() else "fails its digest check"
                start, stop = selection[-1].start, selection[-1].stop
                damaged[index] = (
                    f"{path} is damaged: chunk {index} (training rows {start}-{stop - 1}) of {array.path!r}: "
                    f"{file} {problem}; run the same command again to recompute it"
                )
                break
    return damaged


def _written(ledger: ChunkLedger) -> list[int]:
    return np.flatnonzero(ledger.done()).tolist()


def _repair(
    group: ProcessGroup, path: Path, array: zarr.Array, ledger: ChunkLedger, on_damaged: OnDamaged | None
) -> list[int]:
    """Check every written chunk (shared out among the ranks), mark the damaged ones pending
    again (reported to ``on_damaged`` on rank 0), and return the chunks to compute."""
    with together(group, f"checking the written chunks of {path}"):
        mine = _damaged(path, array, ledger, group.strided(_written(ledger)))
    damaged = merge_mappings(group, mine)
    if group.is_main and damaged:
        for index in damaged:
            ledger.reset(index)
        if on_damaged is not None:
            on_damaged(damaged)
    return agreed(group, ledger.pending)


def _old_layout(path: Path) -> OldOutputError:
    return OldOutputError(
        f"{path} holds scores written by an older source_proj, whose ledger recorded each block's bounds "
        "rather than its values: a deleted or damaged block there cannot be detected, so it is neither "
        f"checked nor resumed. Its 'scores' array is still readable with zarr; delete {path} (or choose "
        "another output) to compute the scores again"
    )


def is_output(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by ``score_matrix`` or ``self_influence``."""
    try:
        attributes = json.loads((Path(path) / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(attributes, dict) and ATTRS_KEY in attributes


def check_output(out: str | os.PathLike) -> OutputCheck:
    """Check a ``score_matrix`` or ``self_influence`` output without writing to it: its pending
    row chunks and every written chunk against the digests of its values.

    Raises ``OldOutputError`` for score outputs of the older layout (no value digests),
    ``FileNotFoundError`` / ``FileExistsError`` when ``out`` is missing or not a bulk output.
    """
    path = Path(out)
    if not path.is_dir():
        raise FileNotFoundError(f"no bulk output at {path}")
    group = zarr.open_group(path, mode="r", zarr_format=3)
    stored = group.attrs.asdict().get(ATTRS_KEY)
    if not isinstance(stored, dict) or stored.get("kind") not in ARRAYS:
        raise FileExistsError(f"{path} is not a source_proj bulk output (score or self-influence)")
    if stored["kind"] == "score_matrix" and stored.get(LEDGER_KEY) != VALUE_DIGESTS:
        raise _old_layout(path)
    name = ARRAYS[stored["kind"]]
    try:
        array = group_array(group, name)
    except KeyError:
        raise StoreCorruptError(f"{path} is damaged: its array {name}/zarr.json is missing") from None
    ledger = ChunkLedger.open(group, "chunk_digest", path)
    return OutputCheck(path, name, ledger.n_chunks, ledger.pending(), _damaged(path, array, ledger, _written(ledger)))


def _open_output(
    path: Path, description: dict[str, Any], name: str, shape: tuple[int, ...], dtype: str,
    chunks: tuple[int, ...], n_chunks: int, parts: Sequence[str] = ("data",),
) -> tuple[zarr.Array, ChunkLedger]:
    """Open the output group at ``path`` if it exists and was made for ``description``,
    else create it with the array ``name`` and a ledger of ``n_chunks`` row chunks of
    ``parts``. The caller holds the lock of ``path``."""
    if not path.exists():

        def build(group: zarr.Group) -> None:
            group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, compressors=None, fill_value=0)
            ChunkLedger.create(group, "chunk_digest", n_chunks, parts)

        create_group_atomically(path, {ATTRS_KEY: description}, build)
    group = zarr.open_group(path, mode="r+", zarr_format=3)
    stored = group.attrs.asdict().get(ATTRS_KEY)
    if not isinstance(stored, dict):
        raise FileExistsError(f"{path} exists and is not a source_proj bulk output")
    if LEDGER_KEY in description and LEDGER_KEY not in stored and stored.get("kind") == description.get("kind"):
        raise _old_layout(path)
    for key in sorted(set(stored) | set(description)):
        if stored.get(key) != description.get(key):
            raise StoreMismatchError(path, key, stored.get(key), description.get(key))
    return group_array(group, name), ChunkLedger.open(group, "chunk_digest", path)


def _open_shared(group: ProcessGroup, path: Path, *args: Any) -> tuple[zarr.Array, ChunkLedger]:
    """``_open_output(path, *args)`` for every rank of ``group``, rank 0 first (it alone
    creates the output)."""
    with together(group, f"opening {path}"):
        if group.is_main:
            opened = _open_output(path, *args)
    return opened if group.is_main else _open_output(path, *args)


def score_matrix(
    store: FeatureStore,
    queries: np.ndarray,
    out: str | os.PathLike,
    *,
    segments: Sequence[int] | None = None,
    query_block: int = 1024,
    progress: bool = True,
    on_damaged: OnDamaged | None = None,
) -> zarr.Array:
    """Write the dense scores ``Q @ F.T`` of ``queries`` (n_query, D) to the zarr group ``out``.

    Args:
        store: a complete feature store (N rows).
        queries: query features Q, (n_query, D) (or (n_query, k) with ``segments``).
        out: output directory; created, or resumed if it holds an unfinished run for the
            same store content, queries and segments (anything else is a
            ``StoreMismatchError``).
        segments: restrict the scores to these segments' per-segment features.
        query_block: queries per written block; memory is about
            2 x query_block x chunk_rows x 4 bytes plus one chunk of features.
        progress: show a progress bar.
        on_damaged: called (on rank 0) with ``{chunk: problem}`` when a rerun finds written
            chunks whose values fail their digests, before they are recomputed.

    Returns:
        The zarr array ``scores``, float32 (n_query, N), chunked (query_block, chunk_rows).
    """
    store.require_complete()
    q = check_queries(queries, store.feature_dim(segments))
    if query_block < 1:
        raise InputError(f"query_block must be >= 1, got {query_block}")
    layout = store.layout
    block = min(query_block, q.shape[0])
    description = {
        "kind": "score_matrix",
        "store_token": store.content_token(),
        "queries_digest": f"{chunk_digest(q):016x}",
        "segments": None if segments is None else sorted(int(s) for s in segments),
        "query_block": block,
        LEDGER_KEY: VALUE_DIGESTS,
    }
    parts = [f"queries {q0}-{min(q0 + block, q.shape[0]) - 1}" for q0 in range(0, q.shape[0], block)]

    group = ProcessGroup.current()
    with group_lock(group, out):
        scores, ledger = _open_shared(
            group, Path(out), description, "scores", (q.shape[0], layout.n_rows), "float32",
            (block, layout.chunk_rows), layout.n_chunks, parts,
        )
        pending = _repair(group, Path(out), scores, ledger, on_damaged)
        _write_scores(store, q, segments, block, scores, ledger, pending, progress and group.is_main, group)
    return scores


def _write_scores(
    store: FeatureStore, q: np.ndarray, segments: Sequence[int] | None, block: int, scores: zarr.Array,
    ledger: ChunkLedger, pending: list[int], progress: bool, group: ProcessGroup,
) -> None:
    """The ``pending`` row chunks of ``score_matrix``'s output, dealt to the ranks of ``group``."""
    q_t = torch.from_numpy(q)
    layout = store.layout

    def write(index: int, start: int, stop: int, q0: int, values: np.ndarray, digests: list[int] | None) -> None:
        scores[q0 : q0 + block, start:stop] = values
        if digests is not None:  # the chunk's last block: every block of it is written
            ledger.mark(index, digests)

    # Blocks are written by a background thread while the next one is computed; at most one
    # write is pending, so memory holds two score blocks.
    with (
        tqdm(total=len(pending), unit="chunk", desc="score matrix", disable=not progress) as bar,
        ThreadPoolExecutor(max_workers=1) as writer,
    ):
        writing: list[Future] = []

        def work(index: int) -> None:
            start, stop = layout.chunk_range(index)
            features_t = torch.from_numpy(store.read_rows(start, stop, segments)).T
            digests = []
            for q0 in range(0, q.shape[0], block):
                values = (q_t[q0 : q0 + block] @ features_t).numpy()
                digests.append(array_digest(values))
                if writing:
                    writing.pop().result()
                last = q0 + block >= q.shape[0]
                writing.append(writer.submit(write, index, start, stop, q0, values, digests if last else None))

        each_chunk(group, pending, work, "the score matrix", lambda batch: bar.update(len(batch)))
        with together(group, "the score matrix"):
            if writing:
                writing.pop().result()


def self_influence(
    store: FeatureStore,
    self_query_chunk: SelfQueryChunk,
    out: str | os.PathLike,
    *,
    segments: Sequence[int] | None = None,
    progress: bool = True,
    on_damaged: OnDamaged | None = None,
) -> np.ndarray:
    """Self-influence ``Qself[m] . F[m]`` of every training row, written to the group ``out``.

    Args:
        store: a complete feature store (N rows).
        self_query_chunk: ``f(start, stop)`` returning the self-query features of training
            rows [start, stop), shape (stop - start, D) (or (.., k) with ``segments``). When
            resuming, pass the same function: finished chunks are not recomputed.
        out: output directory; created, or resumed if made for the same store and segments.
        segments: restrict to these segments' per-segment features.
        progress: show a progress bar.
        on_damaged: as for ``score_matrix``.

    Returns:
        float64 array (N,) of self-influence scores (also in ``out``'s array ``self_influence``).
    """
    store.require_complete()
    layout = store.layout
    dim = store.feature_dim(segments)
    description = {
        "kind": "self_influence",
        "store_token": store.content_token(),
        "segments": None if segments is None else sorted(int(s) for s in segments),
    }

    group = ProcessGroup.current()
    with group_lock(group, out):
        values, ledger = _open_shared(
            group, Path(out), description, "self_influence", (layout.n_rows,), "float64", (layout.chunk_rows,),
            layout.n_chunks,
        )

        def work(index: int) -> None:
            start, stop = layout.chunk_range(index)
            q = np.asarray(self_query_chunk(start, stop))
            if q.shape != (stop - start, dim):
                raise InputError(
                    f"self_query_chunk({start}, {stop}) returned shape {q.shape}; expected {(stop - start, dim)}"
                )
            q = check_queries(q, dim).astype(np.float64)
            row_scores = np.einsum("ij,ij->i", q, store.read_rows(start, stop, segments).astype(np.float64))
            values[start:stop] = row_scores
            ledger.mark(index, [array_digest(row_scores)])

        pending = _repair(group, Path(out), values, ledger, on_damaged)
        with tqdm(total=len(pending), unit="chunk", desc="self-influence", disable=not (progress and group.is_main)) as bar:
            each_chunk(group, pending, work, "self-influence", lambda batch: bar.update(len(batch)))
    return np.asarray(values[:])
