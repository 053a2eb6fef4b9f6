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
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm

from source_proj.distributed.failures import together
from source_proj.distributed.group import ProcessGroup
from source_proj.distributed.locking import group_lock
from source_proj.distributed.work import agreed, each_chunk
from source_proj.features.ledger import (
    ChunkLedger,
    chunk_digest,
    create_group_atomically,
)
from source_proj.features.store import FeatureStore, StoreMismatchError
from source_proj.retrieval.exact import check_queries
from source_proj.errors import InputError

ATTRS_KEY = "source_proj_bulk"
SelfQueryChunk = Callable[[int, int], np.ndarray]


def _open_output(
    path: Path, description: dict[str, Any], name: str, shape: tuple[int, ...], dtype: str,
    chunks: tuple[int, ...], n_chunks: int,
) -> tuple[zarr.Array, ChunkLedger]:
    """Open the output group at ``path`` if it exists and was made for ``description``,
    else create it with the array ``name`` and a ledger of ``n_chunks`` row chunks. The
    caller holds the lock of ``path``."""
    if not path.exists():

        def build(group: zarr.Group) -> None:
            group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, compressors=None, fill_value=0)
            ChunkLedger.create(group, "chunk_digest", n_chunks)

        create_group_atomically(path, {ATTRS_KEY: description}, build)
    group = zarr.open_group(path, mode="r+", zarr_format=3)
    stored = group.attrs.asdict().get(ATTRS_KEY)
    if not isinstance(stored, dict):
        raise FileExistsError(f"{path} exists and is not a source_proj bulk output")
    for key in sorted(set(stored) | set(description)):
        if stored.get(key) != description.get(key):
            raise StoreMismatchError(path, key, stored.get(key), description.get(key))
    return group[name], ChunkLedger.open(group, "chunk_digest", path)


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
    }

    group = ProcessGroup.current()
    with group_lock(group, out):
        scores, ledger = _open_shared(
            group, Path(out), description, "scores", (q.shape[0], layout.n_rows), "float32",
            (block, layout.chunk_rows), layout.n_chunks,
        )
        _write_scores(store, q, segments, block, scores, ledger, progress and group.is_main, group)
    return scores


def _write_scores(
    store: FeatureStore, q: np.ndarray, segments: Sequence[int] | None, block: int, scores: zarr.Array,
    ledger: ChunkLedger, progress: bool, group: ProcessGroup,
) -> None:
    """The pending row chunks of ``score_matrix``'s output, dealt to the ranks of ``group``."""
    q_t = torch.from_numpy(q)
    layout = store.layout

    def write(index: int, start: int, stop: int, q0: int, values: np.ndarray, last: bool) -> None:
        scores[q0 : q0 + block, start:stop] = values
        if last:
            ledger.mark(index, [chunk_digest(np.array([index, start, stop]))])

    # Blocks are written by a background thread while the next one is computed; at most one
    # write is pending, so memory holds two score blocks.
    pending = agreed(group, ledger.pending)
    with (
        tqdm(total=len(pending), unit="chunk", desc="score matrix", disable=not progress) as bar,
        ThreadPoolExecutor(max_workers=1) as writer,
    ):
        writing: list[Future] = []

        def work(index: int) -> None:
            start, stop = layout.chunk_range(index)
            features_t = torch.from_numpy(store.read_rows(start, stop, segments)).T
            for q0 in range(0, q.shape[0], block):
                values = (q_t[q0 : q0 + block] @ features_t).numpy()
                if writing:
                    writing.pop().result()
                writing.append(writer.submit(write, index, start, stop, q0, values, q0 + block >= q.shape[0]))

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
            ledger.mark(index, [chunk_digest(row_scores)])

        pending = agreed(group, ledger.pending)
        with tqdm(total=len(pending), unit="chunk", desc="self-influence", disable=not (progress and group.is_main)) as bar:
            each_chunk(group, pending, work, "self-influence", lambda batch: bar.update(len(batch)))
    return np.asarray(values[:])
