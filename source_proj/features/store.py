"""The feature store: training features F cached in a zarr v3 directory, written crash-safely.

Layout of a store directory (a zarr v3 group):

- ``features``: (N, D) float32 or float16, chunked by ``chunk_rows`` rows, uncompressed
  (projected features are noise-like; compression costs time and saves ~nothing).
- ``row_scale``: (N,) float32, float16 stores only: row m of F is ``features[m] * row_scale[m]``,
  a power of two per row (``codec``: the encoding and its error bound, 2^-11 relative).
- ``segment_features`` / ``segment_scale``: optional (N, L, k) per-segment features
  (scale (N, L)), same encoding, for per-stage attribution.
- ``self_influence``: optional (N,) float64, each row's self-influence when the feature
  computation yields it as a by-product (see ``ChunkFeatures``).
- ``chunk_digest``: the completion ledger (``source_proj.features.ledger``), one row per row
  chunk holding a digest of each array's chunk. Every read checks the chunks it reads against
  it (a damaged, truncated or deleted chunk file raises ``StoreCorruptError`` instead of
  returning wrong or zero rows); ``featurize.featurize`` re-checks the chunks it finds done and
  recomputes the damaged ones.
- ``data_digest``: optional (n_chunks,) uint64, a digest of each chunk's training rows (inputs
  and targets), recorded at creation: ``check_data`` compares training data with it, so a
  changed data set (permuted rows, relabelled rows) is refused rather than mixed with old
  features.
- ``curvature_eigenvalues`` (L, k) and ``curvature_eigenvectors`` (L, k, k), float64,
  optional, validated by a digest kept in the attributes.
- attributes under ``source_proj_store``: format version, a random store id, the layout
  (N, D, dtype, chunk rows, L, k, self-influence kept), the caller's JSON metadata (projection
  seed, kind and dimension, model fingerprint, trajectory summary, ...), the digests of the
  curvature and of ``data_digest``, and a checksum of all of these: an edited or damaged
  block raises ``StoreCorruptError`` when the store is opened.

Scores are ``score(q, m) = Q[q] . F[m]``; this module only stores and returns F (float32).
Memory use of every operation here is bounded by a chunk (or a requested block) of rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm

from source_proj.errors import InputError
from source_proj.features.codec import decode, encode
from source_proj.features.errors import (
    DataMismatchError,
    StoreCorruptError,
    StoreError,
    StoreIncompleteError,
    StoreMismatchError,
)
from source_proj.features.layout import ChunkFeatures, StoreLayout
from source_proj.features.ledger import (
    ChunkLedger,
    array_digest,
    chunk_digest,
    create_group_atomically,
    group_array,
)

FORMAT_VERSION = 2
_LEGACY_METADATA_VERSION = "format_version"
ATTRS_KEY = "source_proj_store"


def _json_roundtrip(value: Any) -> Any:
    try:
        return json.loads(json.dumps(value, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InputError(f"store metadata must be JSON-serialisable: {exc}") from exc


def _first_difference(stored: Any, expected: Any, prefix: str) -> tuple[str, Any, Any] | None:
    """Dotted path and values of the first difference between two JSON values, or None."""
    if isinstance(stored, dict) and isinstance(expected, dict):
        for key in sorted(set(stored) | set(expected)):
            diff = _first_difference(stored.get(key), expected.get(key), f"{prefix}.{key}")
            if diff is not None:
                return diff
        return None
    if stored != expected:
        return prefix, stored, expected
    return None


def _check_block(name: str, block: Any, shape: tuple[int, ...], rows: tuple[int, int]) -> np.ndarray:
    array = np.asarray(block)
    if array.shape != shape:
        raise InputError(
            f"compute_chunk({rows[0]}, {rows[1]}) returned {name} of shape {array.shape}; "
            f"expected {shape}"
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise InputError(f"compute_chunk returned {name} of dtype {array.dtype}; expected floats")
    array = np.asarray(array, dtype=np.float32 if array.dtype != np.float64 else np.float64)
    if not (np.isfinite(array.max()) and np.isfinite(array.min())):  # NaN propagates through both
        bad = np.unique(np.nonzero(~np.isfinite(array))[0]) + rows[0]
        raise InputError(f"compute_chunk returned non-finite {name} for rows {bad[:10].tolist()}")
    return array


def _checksum(attrs: dict[str, Any]) -> str:
    """Checksum of a store's attribute block (all of it but the checksum itself)."""
    payload = json.dumps({k: v for k, v in attrs.items() if k != "checksum"}, sort_keys=True)
    return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


class FeatureStore:
    """A feature store directory; create with ``create``/``open_or_create``, or ``open`` it.

    Attributes:
        path: the store directory.
        layout: its ``StoreLayout``.
        metadata: the JSON metadata it was created with.
        store_id: a random id given at creation (changes when a store is deleted and remade).
    """

    def __init__(self, path: Path, group: zarr.Group) -> None:
        attrs = group.attrs.asdict().get(ATTRS_KEY)
        if not isinstance(attrs, dict):
            raise StoreError(f"{path} is a zarr group but not a source_proj feature store")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"{path} has store format version {attrs.get('format_version')!r}; this version "
                f"of source_proj reads version {FORMAT_VERSION}: fit the features again into a new store"
            )
        if attrs.get("checksum") != _checksum(attrs):
            raise StoreCorruptError(
                f"{path} is damaged: the checksum of its settings ({ATTRS_KEY} in {path / 'zarr.json'}) "
                "does not match them (edited by hand, or damaged?); its features cannot be trusted. Delete "
                "the store and fit it again"
            )
        self.path = path
        self.layout = StoreLayout(**attrs["layout"])
        # The store's format version is the only one; stores written before it was kept alone also
        # carry the attributor's own metadata version (always 1), which is dropped on reading.
        self.metadata: dict[str, Any] = {k: v for k, v in attrs["metadata"].items() if k != _LEGACY_METADATA_VERSION}
        self.store_id: str = attrs["store_id"]
        self._group = group
        self._attrs = attrs
        self._ledger = ChunkLedger.open(group, "chunk_digest", path)
        self._arrays: dict[str, zarr.Array] = {}

    def _array(self, name: str) -> zarr.Array:
        """The row-chunked array ``name``, opened once (each lookup reads its metadata)."""
        if name not in self._arrays:
            try:
                self._arrays[name] = group_array(self._group, name)
            except KeyError:
                raise StoreCorruptError(
                    f"{self.path} is damaged: the array {name!r} ({self.path / name / 'zarr.json'}) is missing"
                ) from None
        return self._arrays[name]

    def _write_attrs(self, **changes: Any) -> None:
        """Rewrite the attribute block with ``changes`` and a fresh checksum (one atomic write)."""
        attrs = {**self._attrs, **changes}
        attrs["checksum"] = _checksum(attrs)
        self._group.attrs.update({ATTRS_KEY: attrs})
        self._attrs = attrs

    # ----------------------------------------------------------------- creation and opening
    @classmethod
    def create(
        cls, path: str | os.PathLike, layout: StoreLayout, metadata: dict[str, Any],
        data_digests: Sequence[int] | None = None,
    ) -> FeatureStore:
        """Create an empty store (all chunks pending) at ``path``, which must not exist.

        ``data_digests``: one digest of the training rows per chunk (``chunk_data_digest``),
        recorded for ``check_data``. Creation is atomic: a crash leaves either no store or a
        complete empty one.
        """
        path = Path(path)
        if path.exists():
            raise FileExistsError(f"{path} exists; open it with FeatureStore.open or open_or_create")
        digests = None
        if data_digests is not None:
            digests = np.array([int(d) for d in data_digests], dtype=np.uint64)
            if digests.shape != (layout.n_chunks,):
                raise InputError(f"data_digests must hold one digest per chunk ({layout.n_chunks}), got {digests.shape}")
        attrs = {
            "format_version": FORMAT_VERSION,
            "store_id": uuid.uuid4().hex,
            "layout": asdict(layout),
            "metadata": _json_roundtrip(metadata),
            "data_digest": None if digests is None else f"{array_digest(digests):016x}",
        }
        attrs["checksum"] = _checksum(attrs)
        create_group_atomically(path, {ATTRS_KEY: attrs}, lambda group: cls._create_arrays(group, layout, digests))
        return cls.open(path, writable=True)

    @staticmethod
    def _create_arrays(group: zarr.Group, layout: StoreLayout, data_digests: np.ndarray | None) -> None:
        rows = layout.chunk_rows

        def array(name: str, shape: tuple[int, ...], dtype: str) -> None:
            group.create_array(
                name, shape=shape, dtype=dtype, chunks=(rows, *shape[1:]), compressors=None, fill_value=0
            )

        array("features", (layout.n_rows, layout.dim), layout.dtype)
        if layout.dtype == "float16":
            array("row_scale", (layout.n_rows,), "float32")
        if layout.n_segments:
            array("segment_features", (layout.n_rows, layout.n_segments, layout.segment_dim), layout.dtype)
            if layout.dtype == "float16":
                array("segment_scale", (layout.n_rows, layout.n_segments), "float32")
        if layout.self_influence:
            array("self_influence", (layout.n_rows,), "float64")
        ChunkLedger.create(group, "chunk_digest", layout.n_chunks, layout.parts())
        if data_digests is not None:
            group.create_array(
                "data_digest", shape=data_digests.shape, dtype="uint64", chunks=data_digests.shape,
                compressors=None, fill_value=0,
            )[...] = data_digests

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        expected_metadata: dict[str, Any] | None = None,
        writable: bool = False,
    ) -> FeatureStore:
        """Open an existing store.

        Args:
            path: the store directory.
            expected_metadata: if given, must equal the stored metadata (after a JSON round
                trip), else ``StoreMismatchError`` names the first differing field.
            writable: open for featurisation (chunk writes) rather than read-only.
        """
        path = Path(path)
        if not (path / "zarr.json").is_file():
            if path.is_dir() and (path / "chunk_digest").is_dir():
                raise StoreCorruptError(f"{path} is damaged: its settings file {path / 'zarr.json'} is missing")
            raise FileNotFoundError(f"no feature store at {path}")
        store = cls(path, zarr.open_group(path, mode="r+" if writable else "r", zarr_format=3))
        if expected_metadata is not None:
            store.check_metadata(expected_metadata)
        return store

    @classmethod
    def open_or_create(
        cls, path: str | os.PathLike, layout: StoreLayout, metadata: dict[str, Any],
        data_digests: Sequence[int] | None = None,
    ) -> FeatureStore:
        """Open the store at ``path`` for writing if it exists (checking that its layout and
        metadata equal the given ones, and its training data digests ``data_digests`` if
        given), else create it. The way to start or resume a run."""
        path = Path(path)
        if not path.exists():
            return cls.create(path, layout, metadata, data_digests)
        store = cls.open(path, expected_metadata=metadata, writable=True)
        store.check_layout(layout)
        if data_digests is not None:
            store.check_data_digests(data_digests)
        return store

    def check_layout(self, expected: StoreLayout) -> None:
        """Raise ``StoreMismatchError`` naming the first layout field that differs."""
        diff = _first_difference(asdict(self.layout), asdict(expected), "layout")
        if diff is not None:
            raise StoreMismatchError(self.path, *diff)

    def check_metadata(self, expected: dict[str, Any], *, ignore: Collection[str] = ()) -> None:
        """Raise ``StoreMismatchError`` naming the first field where ``expected`` differs,
        leaving out the top-level keys in ``ignore``."""
        stored = {k: v for k, v in self.metadata.items() if k not in ignore}
        wanted = {k: v for k, v in _json_roundtrip(expected).items() if k not in ignore}
        diff = _first_difference(stored, wanted, "metadata")
        if diff is not None:
            raise StoreMismatchError(self.path, *diff)

    # ------------------------------------------------------------------- training data
    def data_digests(self) -> np.ndarray | None:
        """The recorded digests of each chunk's training rows, uint64 (n_chunks,), or None."""
        recorded = self._attrs.get("data_digest")
        if recorded is None:
            return None
        try:
            digests = np.asarray(group_array(self._group, "data_digest")[...], dtype=np.uint64)
        except (KeyError, ValueError):
            digests = None
        if digests is None or f"{array_digest(digests):016x}" != recorded:
            raise StoreCorruptError(f"{self.path} is damaged: its training-data digests (data_digest) are unreadable")
        return digests

    def check_data_digests(self, digests: Sequence[int], chunks: Sequence[int] | None = None) -> None:
        """Raise ``DataMismatchError`` naming the first chunk whose training rows' digest (in
        ``digests``, aligned with ``chunks``, default all chunks) differs from the recorded one."""
        recorded = self.data_digests()
        if recorded is None:
            raise StoreError(f"feature store {self.path} records no digests of its training data")
        chunks = range(self.layout.n_chunks) if chunks is None else list(chunks)
        given = np.array([int(d) for d in digests], dtype=np.uint64)
        if given.shape != (len(chunks),):
            raise InputError(f"expected {len(chunks)} data digests, got {given.shape}")
        differing = [c for c, d in zip(chunks, given) if recorded[c] != d]
        if differing:
            raise DataMismatchError(
                self.path, differing[0], self.layout.chunk_range(differing[0]), len(differing), len(chunks)
            )

    # ----------------------------------------------------------------------------- progress
    def pending_chunks(self) -> list[int]:
        """Indices of the chunks not yet written."""
        return self._ledger.pending()

    @property
    def is_complete(self) -> bool:
        return bool(self._ledger.done().all())

    @property
    def n_rows(self) -> int:
        """N, the number of training rows (``FeatureSource``)."""
        return self.layout.n_rows

    @property
    def n_segments(self) -> int:
        """L if the store keeps per-segment features, else 0 (``FeatureSource``)."""
        return self.layout.n_segments

    def require_complete(self) -> None:
        """Raise ``StoreIncompleteError`` unless every chunk has been written."""
        pending = self.pending_chunks()
        if pending:
            raise StoreIncompleteError(
                f"feature store {self.path} is incomplete: {len(pending)} of "
                f"{self.layout.n_chunks} chunks pending (first: {pending[:5]}); resume the "
                "featurisation to finish it"
            )

    def content_token(self) -> str:
        """A digest of the store's identity, settings and every chunk's data."""
        payload = json.dumps([self.store_id, asdict(self.layout), self.metadata], sort_keys=True)
        h = hashlib.blake2b(payload.encode(), digest_size=16)
        h.update(self._ledger.content_digest().encode())
        return h.hexdigest()

    # ------------------------------------------------------------------------- integrity
    def _chunk_file(self, name: str, index: int) -> Path:
        array = self._array(name)
        return self.path / name / "c" / str(index) / Path(*("0" * (array.ndim - 1)))

    def _read_chunk(self, index: int, names: Sequence[str], expected: np.ndarray) -> list[np.ndarray]:
        """The stored arrays ``names`` of chunk ``index`` (all its rows), each checked
        against the chunk's ledger row ``expected``; raises ``StoreCorruptError`` naming the
        chunk and file when one is missing, unreadable or fails its digest."""
        start, stop = self.layout.chunk_range(index)
        parts = self._ledger.parts
        out = []
        for name in names:
            try:
                data = np.asarray(self._array(name)[start:stop])
            except ValueError as exc:  # zarr: a truncated chunk file does not reshape
                raise StoreCorruptError(
                    f"{self.path} is damaged: chunk {index} of {name!r} ({self._chunk_file(name, index)}) is "
                    f"unreadable ({exc}); run 'source-proj fit' again to recompute damaged chunks"
                ) from None
            if array_digest(data) != int(expected[parts.index(name)]):
                file = self._chunk_file(name, index)
                problem = "is missing (it would read as zeros)" if not file.exists() else "fails its digest check"
                raise StoreCorruptError(
                    f"{self.path} is damaged: chunk {index} of {name!r} ({file}) {problem}; run 'source-proj "
                    "fit' again to recompute damaged chunks, or 'source-proj verify' to list them"
                )
            out.append(data)
        return out

    def written_chunks(self) -> list[int]:
        """Indices of the chunks marked written in the ledger."""
        return np.nonzero(self._ledger.digests()[:, 0] != 0)[0].tolist()

    def damaged_chunks(self, chunks: Collection[int] | None = None, *, progress: bool = False) -> dict[int, str]:
        """Check every written chunk (or the written ones among ``chunks``) of every array
        against its digests: ``{chunk: what is wrong}`` for the damaged ones (empty when all
        are intact). Reads what it checks."""
        digests = self._ledger.digests()
        damaged = {}
        done = self.written_chunks() if chunks is None else sorted(c for c in chunks if digests[c, 0] != 0)
        for index in tqdm(done, desc="verify store", unit="chunk", disable=not progress):
            try:
                self._read_chunk(index, self._ledger.parts, digests[index])
            except StoreCorruptError as exc:
                damaged[index] = str(exc)
        return damaged

    def verify_curvature(self) -> None:
        """Raise ``StoreCorruptError`` if the stored curvature fails its digest check."""
        self.curvature()

    # ------------------------------------------------------------------------------ writing
    def check_chunk(self, index: int, chunk: np.ndarray | ChunkFeatures) -> ChunkFeatures:
        """Validate what ``compute_chunk`` returned for chunk ``index`` against the layout
        (shapes, float dtype, finite values, which parts are present); returns it as a
        ``ChunkFeatures`` of arrays. Raises ``ValueError`` naming the problem."""
        layout = self.layout
        start, stop = layout.chunk_range(index)
        n = stop - start
        if not isinstance(chunk, ChunkFeatures):
            chunk = ChunkFeatures(chunk)
        for name, given, kept in (
            ("segment_features", chunk.segment_features, layout.n_segments > 0),
            ("self_influence", chunk.self_influence, layout.self_influence),
        ):
            if (given is not None) != kept:
                raise InputError(
                    f"store {self.path} was created {'with' if kept else 'without'} {name}: the "
                    f"computed chunks {'must' if kept else 'cannot'} include it (see ChunkFeatures)"
                )
        rows = (start, stop)
        return ChunkFeatures(
            _check_block("features", chunk.features, (n, layout.dim), rows),
            None if chunk.segment_features is None else _check_block(
                "segment_features", chunk.segment_features, (n, layout.n_segments, layout.segment_dim), rows
            ),
            None if chunk.self_influence is None else _check_block(
                "self_influence", chunk.self_influence, (n,), rows
            ).astype(np.float64),
        )

    def _write_checked(self, index: int, chunk: ChunkFeatures) -> int:
        """Encode and write a checked chunk, then mark it complete; returns its row count."""
        start, stop = self.layout.chunk_range(index)
        written = {}
        for name, scale_name, block in (
            ("features", "row_scale", chunk.features),
            ("segment_features", "segment_scale", chunk.segment_features),
        ):
            if block is None:
                continue
            written[name], scale = encode(block, self.layout.dtype)
            if scale is not None:
                written[scale_name] = scale
        if chunk.self_influence is not None:
            written["self_influence"] = chunk.self_influence
        for name, data in written.items():
            self._array(name)[start:stop] = data
        self._ledger.mark(index, [array_digest(written[name]) for name in self._ledger.parts])
        return stop - start

    def reset_chunks(self, indices: Collection[int]) -> None:
        """Mark chunks pending again, e.g. damaged ones, so that ``featurize`` rewrites them."""
        for index in indices:
            self._ledger.reset(index)

    def write_curvature(self, eigenvalues: np.ndarray, eigenvectors: np.ndarray) -> None:
        """Store the per-segment curvature: eigenvalues (L, k) and eigenvectors (L, k, k),
        float64. Refused if the store already holds a (complete) curvature."""
        if self.curvature() is not None:
            raise StoreError(f"feature store {self.path} already holds a curvature")
        values = np.asarray(eigenvalues, dtype=np.float64)
        vectors = np.asarray(eigenvectors, dtype=np.float64)
        if values.ndim != 2 or vectors.shape != (*values.shape, values.shape[1]):
            raise InputError(
                "curvature must be eigenvalues (L, k) and eigenvectors (L, k, k); got shapes "
                f"{values.shape} and {vectors.shape}"
            )
        for name, data in (("curvature_eigenvalues", values), ("curvature_eigenvectors", vectors)):
            array = self._group.create_array(
                name, shape=data.shape, dtype="float64", chunks=data.shape, compressors=None,
                fill_value=0, overwrite=True,
            )
            array[...] = data
        # The digest goes in last (one atomic rewrite of zarr.json): it certifies both arrays.
        self._write_attrs(curvature_digest=chunk_digest(values, vectors))

    # ------------------------------------------------------------------------------ reading
    def curvature(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(eigenvalues (L, k), eigenvectors (L, k, k)) float64, or None if not stored."""
        digest = self._attrs.get("curvature_digest")
        if digest is None:
            return None
        values: np.ndarray | None
        vectors: np.ndarray | None
        try:
            values = np.asarray(group_array(self._group, "curvature_eigenvalues")[...])
            vectors = np.asarray(group_array(self._group, "curvature_eigenvectors")[...])
        except (KeyError, ValueError):
            values = vectors = None
        if values is None or vectors is None or chunk_digest(values, vectors) != digest:
            raise StoreCorruptError(
                f"{self.path} is damaged: its stored curvature (curvature_eigenvalues, curvature_eigenvectors) "
                "is missing or fails its digest check; delete the store and fit it again"
            )
        return values, vectors

    def self_influence(self) -> np.ndarray:
        """The stored self-influence column, (N,) float64 (complete stores only), each chunk
        checked against its digest."""
        if not self.layout.self_influence:
            raise InputError(f"feature store {self.path} keeps no self-influence column")
        self.require_complete()
        digests = self._ledger.digests()
        return np.concatenate([
            self._read_chunk(i, ["self_influence"], digests[i])[0] for i in range(self.layout.n_chunks)
        ]).astype(np.float64)

    def read_rows(
        self,
        start: int,
        stop: int,
        segments: Sequence[int] | None = None,
        *,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Features of rows [start, stop) as float32, shape (stop - start, D).

        With ``segments``, returns instead the sum of those segments' per-segment features,
        shape (stop - start, k): the features of an attribution restricted to those segments.
        The rows must lie in completed chunks. ``out`` (a C-contiguous float32 array of that
        shape) receives them when given: rows are read and decoded one store chunk at a
        time into it, so no temporary is larger than a chunk. Each chunk read is checked
        against its digests (``StoreCorruptError`` if it fails); the chunks at either end are
        read whole for that.
        """
        layout = self.layout
        if not 0 <= start <= stop <= layout.n_rows:
            raise IndexError(f"rows [{start}, {stop}) out of range for a store of {layout.n_rows} rows")
        first, last = start // layout.chunk_rows, -(-stop // layout.chunk_rows)
        digests = self._ledger.digests(first, last)
        if not (digests[:, 0] != 0).all():
            raise StoreIncompleteError(
                f"rows [{start}, {stop}) of feature store {self.path} are not all written yet"
            )
        if segments is not None:
            segments = self._check_segments(segments)
        shape = (stop - start, self.feature_dim(segments))
        if out is None:
            out = np.empty(shape, dtype=np.float32)
        elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise InputError(f"out must be a C-contiguous float32 array of shape {shape}")
        f16 = layout.dtype == "float16"
        for index in range(first, last):
            c0, c1 = layout.chunk_range(index)
            lo, hi = max(start, c0), min(stop, c1)
            target = torch.from_numpy(out[lo - start : hi - start])
            name = "features" if segments is None else "segment_features"
            names = [name, *(["row_scale" if segments is None else "segment_scale"] if f16 else [])]
            stored, *scales = self._read_chunk(index, names, digests[index - first])
            stored = stored[lo - c0 : hi - c0]
            scale = scales[0][lo - c0 : hi - c0] if f16 else None
            if segments is None:
                decode(stored, scale, target)
            else:
                stored = stored[:, segments]
                scale = None if scale is None else scale[:, segments]
                target.copy_(torch.from_numpy(decode(stored, scale)).sum(dim=1))
        return out

    def _check_segments(self, segments: Sequence[int]) -> list[int]:
        n_seg = self.layout.n_segments
        if not n_seg:
            raise InputError(f"feature store {self.path} keeps no per-segment features")
        chosen = sorted({int(s) for s in segments})
        if not chosen or chosen[0] < 0 or chosen[-1] >= n_seg:
            raise InputError(f"segments must be a non-empty subset of range({n_seg}), got {list(segments)}")
        return chosen

    def feature_dim(self, segments: Sequence[int] | None = None) -> int:
        """Length of the rows that ``read_rows(..., segments)`` returns."""
        if segments is None:
            return self.layout.dim
        self._check_segments(segments)
        return self.layout.segment_dim

    def iter_blocks(
        self,
        block_rows: int,
        segments: Sequence[int] | None = None,
        *,
        prefetch: bool = True,
        reuse_buffers: bool = False,
        select: Callable[[list[int]], list[int]] | None = None,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, rows)`` over the whole (complete) store in blocks of about
        ``block_rows`` rows (rounded up to whole chunks), float32 (n, D) or (n, k).
        ``select`` picks, from the list of all block starts, the ones to yield (e.g. one
        process's share), in order.

        With ``prefetch`` the next block is read in a background thread while the caller
        works on the current one (at most two blocks in memory). With ``reuse_buffers`` the
        blocks are written into two (one without prefetch) arrays allocated once, so a block
        is valid only until the next one is requested; fresh arrays of this size cost page
        faults on every block.
        """
        self.require_complete()
        step = max(1, -(-block_rows // self.layout.chunk_rows)) * self.layout.chunk_rows
        starts = list(range(0, self.layout.n_rows, step))
        if select is not None:
            starts = select(starts)
        width = self.feature_dim(segments)
        buffers = [np.empty((min(step, self.layout.n_rows), width), np.float32) for _ in range(1 + prefetch)] if reuse_buffers else []

        def read(i: int) -> np.ndarray:
            start = starts[i]
            stop = min(start + step, self.layout.n_rows)
            out = buffers[i % len(buffers)][: stop - start] if buffers else None
            return self.read_rows(start, stop, segments, out=out)

        if not prefetch or not starts:
            for i, start in enumerate(starts):
                yield start, read(i)
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(read, 0)
            for i, start in enumerate(starts):
                block = pending.result()
                if i + 1 < len(starts):
                    pending = pool.submit(read, i + 1)
                yield start, block
