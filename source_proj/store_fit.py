"""A ``SourceAttributor``'s training features in a feature store, and queries against it.

``fit_store`` is the store-backed counterpart of ``SourceAttributor.fit``: it runs the
curvature pass, then featurises the training rows chunk by chunk into a zarr store (with the
per-segment curvature, the per-row self-influence and, if the attributor keeps them, the
per-segment features), resuming an interrupted run. Before any costly work it takes the
store's lock, checks the settings of an existing store, and reads the training rows once:
their targets are validated for the task and each store chunk's rows are digested
(``rows_digest``), so that a store is only ever resumed with the data it was made from.
``open_store`` reopens a finished store for queries after checking that it was made with the
same model, trajectory and settings; ``check_training_data`` compares data with a store.

The store's metadata is the attributor's ``metadata()`` (with the segment weights w_l = 1/N_l,
a custom task's ``fingerprint`` (its loss's code and settings),
the checkpoints' content digests and, for Adam runs, the optimizer's betas and eps and a digest
of each checkpoint's optimizer state, so that a store built with other states is refused) plus
``source_config``: the estimator settings (``SourceConfig`` without the run-time fields), from
which ``store_config`` rebuilds the configuration for querying.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from source_proj.config import RUNTIME_FIELDS, SourceConfig
from source_proj.curvature.spectra import SegmentSpectrum
from source_proj.distributed.failures import together
from source_proj.distributed.gather import merge_mappings
from source_proj.errors import InputError
from source_proj.features.errors import StoreMismatchError
from source_proj.features.featurize import FeaturizeReport, featurize
from source_proj.features.layout import ChunkFeatures, StoreLayout
from source_proj.features.ledger import array_digest
from source_proj.features.locking import group_lock
from source_proj.features.store import FeatureStore
from source_proj.gradients.data import Examples, as_examples
from source_proj.gradients.memory import MemoryBudgetError
from source_proj.trajectory.digests import FileDigests, write_cache

if TYPE_CHECKING:  # the attributor calls into this module; it never needs the class at run time
    from source_proj.attributor import SourceAttributor

# Metadata known only after the curvature pass (checked then, not before it).
_AFTER_PREPARE = ("stages", "segment_weights")
# Beside the store: the factored projection's rank-one fits of Adam's D^{1/2} (a cache).
FITS_FILE = "rank_one_fits.pt"


def load_rank_one_fits(path: str | os.PathLike) -> dict[str, Any]:
    """The rank-one fits kept beside the store at ``path`` (``SourceAttributor.rank_one_fits``;
    empty if absent or unreadable: a fit missing from it is only computed again)."""
    try:
        fits = torch.load(Path(path) / FITS_FILE, weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError):
        return {}
    return fits if isinstance(fits, dict) else {}


def save_rank_one_fits(attributor: SourceAttributor, path: str | os.PathLike) -> None:
    """Add the attributor's rank-one fits to those kept beside the store at ``path``, atomically
    (queries then skip fitting them: ``open_store``); a folder that cannot be written is left."""
    fits = {**load_rank_one_fits(path), **attributor.rank_one_fits()}
    if fits:
        write_cache(Path(path) / FITS_FILE, lambda temporary: torch.save(fits, temporary))


def store_config(store: FeatureStore, **runtime: Any) -> SourceConfig:
    """The ``SourceConfig`` a store was made with, with run-time fields (``chunk_size``,
    ``device``, ``progress``, ``backend``) from ``runtime``."""
    unknown = set(runtime) - set(RUNTIME_FIELDS)
    if unknown:
        raise InputError(f"only run-time fields {RUNTIME_FIELDS} can be overridden, got {sorted(unknown)}")
    return SourceConfig(**store.metadata["source_config"], **runtime)


def _metadata(attributor: SourceAttributor) -> dict[str, Any]:
    # A custom task's fingerprint (``Task.fingerprint``): its name alone ("custom") would let
    # a resumed fit mix two losses in one store.
    fingerprint = attributor.task.fingerprint()
    return {
        **attributor.metadata(),
        **({"task_fingerprint": fingerprint} if fingerprint is not None else {}),
        "source_config": attributor.config.recorded_settings(),
    }


def _feature_dim(attributor: SourceAttributor) -> int:
    k = attributor.proj_dim
    return attributor.query_form.feature_width(k)


def _keeps_segments(attributor: SourceAttributor) -> bool:
    # In the per-segment form F already is the per-segment features side by side.
    return not attributor.query_form.per_segment and attributor.keeps_segment_features


def _curvature_arrays(attributor: SourceAttributor) -> tuple[np.ndarray, np.ndarray]:
    spectra = attributor.spectra
    assert spectra is not None, "the curvature is written after set_curvature"
    values = torch.stack([s.eigenvalues for s in spectra]).numpy()
    vectors = torch.stack([s.eigenvectors for s in spectra]).numpy()
    return values, vectors


def _compute_chunk(
    attributor: SourceAttributor, examples: Examples, keep_segments: bool
) -> Callable[[int, int], ChunkFeatures]:
    def compute(start: int, stop: int) -> ChunkFeatures:
        rows = attributor.featurize_range(examples, start, stop)
        segments = None
        if keep_segments:
            assert rows.segment_features is not None, "featurize_range keeps them when the attributor does"
            segments = rows.segment_features.numpy()
        return ChunkFeatures(rows.features.numpy(), segments, rows.self_influence.numpy())

    return compute


def rows_digest(value: Any) -> int:
    """A non-zero 64-bit digest of a batch of rows as ``Examples.rows`` returns them: tensors
    (dtype, shape and bytes), tuples, lists and dicts of them, numpy arrays, and plain
    Python values (by their repr)."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        return _combined(f"tensor {value.dtype} {tuple(value.shape)}", [array_digest(flat.view(torch.uint8).numpy())])
    if isinstance(value, np.ndarray):
        return array_digest(value)
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda item: str(item[0]))
        return _combined("dict", [rows_digest(x) for key, v in items for x in (str(key), v)])
    if isinstance(value, (tuple, list)):
        return _combined("sequence", [rows_digest(v) for v in value])
    return _combined(repr(value), [])


def _combined(tag: str, digests: list[int]) -> int:
    head = array_digest(np.frombuffer(tag.encode(), dtype=np.uint8))
    return array_digest(np.array([head, *digests], dtype=np.uint64))


def examples_digest(examples: Examples, chunk_rows: int = 4096) -> int:
    """One :func:`rows_digest` of every row's inputs and targets, read ``chunk_rows`` at a time
    (what an attributor keys the Hessians and query features it keeps by)."""
    return rows_digest([
        rows_digest(examples.rows(start, min(len(examples), start + chunk_rows)))
        for start in range(0, len(examples), chunk_rows)
    ])


def training_data_digests(
    attributor: SourceAttributor,
    examples: Examples,
    chunk_rows: int,
    *,
    chunks: Sequence[int] | None = None,
    measure: bool = True,
) -> list[int]:
    """Validate the targets of the rows of the given store chunks (default all) for the
    attributor's task and return each chunk's ``rows_digest`` of (inputs, targets); with
    ``measure``, set the attributor's ``chunk_size`` for featurising them (``check_training_data``)."""
    digests: dict[int, int] = {}
    wanted = None if chunks is None else set(chunks)

    def visit(start: int, stop: int, inputs: Any, targets: torch.Tensor) -> None:
        digests[start // chunk_rows] = rows_digest((inputs, targets))

    attributor.check_training_data(examples, chunk_rows, visit, chunks=wanted, measure=measure)
    return [digests[c] for c in sorted(digests)]


def check_training_data(
    attributor: SourceAttributor, store: FeatureStore, train_data: Any, *, chunks: Sequence[int] | None = None
) -> None:
    """Raise unless ``train_data`` are the rows ``store`` was made from: the same number of
    rows (``StoreMismatchError`` on ``layout.n_rows``) and, for the given chunks (default
    all: a full pass over the data), the same inputs and targets (``DataMismatchError``
    naming the first differing chunk). The rows' activations are not measured: no
    featurisation of them follows."""
    examples = as_examples(train_data)
    if len(examples) != store.layout.n_rows:
        raise StoreMismatchError(store.path, "layout.n_rows", store.layout.n_rows, len(examples))
    chunks = sorted(set(range(store.layout.n_chunks) if chunks is None else chunks))
    digests = training_data_digests(attributor, examples, store.layout.chunk_rows, chunks=chunks, measure=False)
    store.check_data_digests(digests, chunks)


def _check_writable(path: Path) -> None:
    """Fail before any work if the store cannot be written at ``path``."""
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write the feature store {path}: folder {parent} does not exist")
    target = path if path.exists() else parent
    if not os.access(target, os.W_OK):
        raise PermissionError(f"cannot write the feature store {path}: {target} is not writable")


def available_memory() -> int | None:
    """Bytes of memory this process can still take: Linux's MemAvailable, capped by the
    cgroup's limit where one is set (``os.sysconf`` elsewhere; None if nothing says)."""
    found = []
    try:
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        found += [int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            pass
    return min(found) if found else None


def check_chunk_memory(layout: StoreLayout, available: int | None) -> None:
    """Refuse (``MemoryBudgetError``, naming ``chunk_rows`` and a value that fits) a layout
    whose chunk buffers would take more than half the ``available`` bytes (None: no check).

    A chunk of n = min(chunk_rows, N) rows is computed as float32 features (float64
    self-influence), and written, like every chunk read back, through a buffer of all
    ``chunk_rows`` rows at the stored dtype (zarr pads the last chunk to full size) plus its
    encoded bytes; featurisation holds two chunks (one computed while the last is written):
    2 (n x computed row + 2 chunk_rows x stored row) bytes."""
    if available is None:
        return
    width = layout.dim + layout.n_segments * layout.segment_dim
    computed_row = 4 * width + 8
    stored_row = (
        width * (2 if layout.dtype == "float16" else 4)
        + (4 * (1 + layout.n_segments) if layout.dtype == "float16" else 0)
        + (8 if layout.self_influence else 0)
    )
    n, rows, limit = layout.n_rows, layout.chunk_rows, available // 2
    need = 2 * (min(rows, n) * computed_row + 2 * rows * stored_row)
    if need <= limit:
        return
    fits = limit // (2 * (computed_row + 2 * stored_row))
    if fits >= n:  # all N rows in one chunk fit; so do some rows of padding
        fits = (limit - 2 * n * computed_row) // (4 * stored_row)
    advice = (
        f"use chunk_rows={min(fits, n)} (--chunk-rows {min(fits, n)}) or fewer"
        if fits >= 1 else "not even one row fits: free memory"
    )
    raise MemoryBudgetError(
        f"chunk_rows={rows:,} (--chunk-rows) needs about {need / 2**30:.1f} GiB for the feature store's chunk "
        f"buffers (two chunks of {rows:,} rows of {stored_row} stored and {computed_row} computed bytes), over "
        f"half the {available / 2**30:.1f} GiB of memory available: {advice}"
    )


def fit_store(
    attributor: SourceAttributor,
    train_data: Any,
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    chunk_rows: int = 4096,
    stages: Sequence[Hashable] | None = None,
    num_train: int | Mapping[Hashable, int] | None = None,
    curvature_data: Any = None,
) -> tuple[FeatureStore, FeaturizeReport]:
    """Featurise ``train_data`` into the store at ``path`` (created, or resumed if it exists).

    Args:
        attributor: the attributor (its config decides k, L, query mode, ...).
        train_data: the training rows (as for ``SourceAttributor.fit``); store row i is row i.
        path: the store directory.
        dtype: "float32" or "float16" (half the disk; scores within 2^-11 relative, see
            ``source_proj.features.store``).
        chunk_rows: rows per store chunk (the unit of resumption and of memory use: one
            that does not fit in memory is refused first, see ``check_chunk_memory``).
        stages: as for ``SourceAttributor.prepare``.
        num_train: as for ``SourceAttributor.prepare``.
        curvature_data: as for ``SourceAttributor.prepare``.

    Returns:
        The complete store and what this call computed. Before any costly work: the store's
        lock is taken (``StoreLockedError`` names the writer holding it), the training
        targets are validated for the task (e.g. class labels in range), and a store at
        ``path`` made with another model, checkpoints, trajectory, settings or training data
        raises ``StoreMismatchError`` (``DataMismatchError`` for the data, naming the first
        differing chunk). A resumed run reuses the stored curvature (``curvature_data`` is
        then unused), checks the chunks it finds done and recomputes damaged ones.
    """
    path = Path(path)
    examples = as_examples(train_data)
    keep_segments = _keeps_segments(attributor)
    layout = StoreLayout(
        n_rows=len(examples),
        dim=_feature_dim(attributor),
        dtype=dtype,
        chunk_rows=chunk_rows,
        n_segments=attributor.num_segments if keep_segments else 0,
        segment_dim=attributor.proj_dim if keep_segments else 0,
        self_influence=True,
    )
    check_chunk_memory(layout, available_memory())
    _check_writable(path)
    group = attributor.group
    # One reading pass: the data check, the curvature and every store chunk read each checkpoint once.
    with group_lock(group, path), attributor.reading_pass():
        with together(group, "checking the existing store"):
            existing = FeatureStore.open(path) if path.exists() else None
            # An existing store's cache; for a new one, the attributor's (saved beside the store below).
            use_file_digests(attributor, attributor.file_digests if existing is None else FileDigests.load(path))
            if existing is not None:  # refuse other settings before reading the data
                attributor.use_recorded_projection(existing.metadata["projection"])
                check_store_settings(attributor, existing)
                existing.check_layout(layout)
        digests = _shared_digests(attributor, examples, layout)
        stored = None
        with together(group, "checking the training data against the store"):
            if existing is not None:  # and other data before the curvature pass
                existing.check_data_digests(digests)
                stored = existing.curvature()
        if stored is None:
            attributor.prepare(examples, stages=stages, num_train=num_train, curvature_data=curvature_data)
        else:
            spectra = [
                SegmentSpectrum(torch.from_numpy(values), torch.from_numpy(vectors), seg.time)
                for values, vectors, seg in zip(*stored, attributor.segments)
            ]
            attributor.set_curvature(spectra, attributor.segment_weights(len(examples), stages, num_train))
        with together(group, "creating the store"):  # rank 0 alone creates it and writes metadata
            if group.is_main:
                store = FeatureStore.open_or_create(path, layout, _metadata(attributor), digests)  # checks stages, weights
                attributor.file_digests.save(path)  # later queries need not re-hash the checkpoints and states
                if stored is None:
                    store.write_curvature(*_curvature_arrays(attributor))
        if not group.is_main:
            store = FeatureStore.open(path, expected_metadata=_metadata(attributor), writable=True)
        report = featurize(
            store, _compute_chunk(attributor, examples, keep_segments), progress=attributor.config.progress, group=group
        )
        if group.is_main:
            save_rank_one_fits(attributor, path)
    return store, report


def _shared_digests(attributor: SourceAttributor, examples: Examples, layout: StoreLayout) -> list[int]:
    """``training_data_digests`` of every store chunk, each rank digesting its round-robin
    share (the whole list on every rank)."""
    group = attributor.group
    with together(group, "reading the training data"):
        mine = group.strided(list(range(layout.n_chunks)))
        found = dict(zip(mine, training_data_digests(attributor, examples, layout.chunk_rows, chunks=mine)))
    found = merge_mappings(group, found)
    return [found[c] for c in range(layout.n_chunks)]


def check_store_settings(attributor: SourceAttributor, store: FeatureStore) -> None:
    """Raise ``StoreMismatchError`` unless ``store`` was made with ``attributor``'s model,
    checkpoints, trajectory and settings."""
    store.check_metadata(_metadata(attributor), ignore=_AFTER_PREPARE)


def open_store(attributor: SourceAttributor, path: str | os.PathLike) -> FeatureStore:
    """Open the complete store at ``path`` for ``attributor``'s queries, checking that it was
    made with the same model, trajectory and settings (``StoreMismatchError`` otherwise).

    The checkpoints' and optimizer states' digests come from the store's cache for files whose
    size and modification time are unchanged (``trajectory.digests``): a query reads only the
    checkpoints and states it needs, each checked against its recorded digest as it is read.
    The factored projection's rank-one fits of Adam's D^{1/2} come from the fit's cache
    (``FITS_FILE``), each for the optimizer state (by digest), Adam settings and projection it
    was fitted with."""
    store = FeatureStore.open(path)
    cached = FileDigests.load(path)
    known = dict(cached.entries)
    use_file_digests(attributor, cached)
    attributor.use_recorded_projection(store.metadata["projection"])
    check_store_settings(attributor, store)
    store.require_complete()
    attributor.use_rank_one_fits(load_rank_one_fits(path))
    if cached.entries != known and attributor.group.is_main:  # files hashed now (new, or changed since)
        cached.save(path)
    return store


def use_file_digests(attributor: SourceAttributor, cache: FileDigests) -> None:
    """``attributor`` takes the digests of its checkpoint files and of its optimizer-state files
    (``Preconditioner.use_file_digests``) from ``cache`` where the files are unchanged, and adds
    those it computes later to it."""
    attributor.use_file_digests(cache)
    attributor.preconditioner.use_file_digests(cache)


def stage_restriction(
    attributor: SourceAttributor, store: FeatureStore, stage: str, queries: np.ndarray
) -> tuple[np.ndarray, list[int] | None]:
    """Queries and segment indices for scores restricted to training stage ``stage`` (a label
    or its text, see ``SourceAttributor.stage_segments``): ``search(store, queries,
    segments=...)`` then keeps only the terms of that stage's segments.

    How depends on the query form (``QueryForm.restrict_queries``): in the per-segment form the
    queries' blocks of other segments are zeroed; in the final form the store must keep
    per-segment features (``keep_segment_features``).
    """
    chosen = attributor.stage_segments(stage)
    try:
        return attributor.query_form.restrict_queries(queries, chosen, store.layout.n_segments > 0)
    except InputError as exc:
        raise InputError(f"feature store {store.path}: {exc}") from None
