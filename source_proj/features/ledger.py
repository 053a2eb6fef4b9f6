"""Crash-safe building blocks of resumable zarr outputs: atomic creation, digests, completion ledger.

``create_group_atomically`` builds a group's skeleton in a temporary sibling directory and
renames it into place, so a crash leaves either nothing or a complete empty group (and at
worst a ``.NAME.creating-*`` folder, removed by ``remove_leftovers``). A ledger is a zarr
array of uint64 with one row per row chunk, each row in its own zarr chunk (one small file):
after a chunk's data have been written, its row is set to the digests of those data, one per
part (e.g. the features and their scales); a row of zeros means "not written yet". zarr's
local store (from zarr 3.1.3 on, hence the version required below) writes every file through
a temporary file and a rename, so a process killed at any instant leaves each ledger row
either pending or complete, and the data of a complete chunk are all written. The digests
let readers check each chunk's data when they read them (``verify_digests``) and
fingerprint the content (``ChunkLedger.content_digest``).

Digests are 64-bit XXH3 hashes (``xxhash``) of an array's dtype, shape and bytes: they
detect accidental change (bit flips, truncation, a deleted chunk file read back as zeros) at
tens of GB/s; they are not cryptographic (``benchmarks/results/integrity-*.md`` measures
the cost of checking them on every read).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import xxhash
import zarr

from source_proj.errors import InputError
from source_proj.features.errors import StoreCorruptError

# zarr writes files atomically (temporary file + rename) from this version on; older 3.0.x
# versions write chunks in place, and a kill can leave a truncated ledger row.
MIN_ZARR = (3, 1, 3)


def zarr_version_ok(version: str) -> bool:
    """Whether a zarr version string is at least ``MIN_ZARR`` (pre-releases count as it)."""
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3]) >= MIN_ZARR


if not zarr_version_ok(zarr.__version__):  # pragma: no cover - guarded by pyproject
    raise ImportError(
        f"source_proj needs zarr >= {'.'.join(map(str, MIN_ZARR))} (atomic file writes; crash safety relies "
        f"on them), found zarr {zarr.__version__}: pip install 'zarr>=3.1.3,<4'"
    )


def create_group_atomically(path: Path, attributes: dict[str, Any], build: Callable[[zarr.Group], None]) -> None:
    """Create the zarr v3 group ``path`` (which must not exist) with ``attributes``, let
    ``build`` add its arrays, then move it into place in one rename."""
    if path.exists():
        raise FileExistsError(f"{path} already exists")
    tmp = path.with_name(f".{path.name}.creating-{uuid.uuid4().hex}")
    try:
        build(zarr.open_group(tmp, mode="w", zarr_format=3, attributes=attributes))
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_leftovers(path: Path) -> None:
    """Delete what killed writers of ``path`` left: temporary files of chunk writes under it
    and half-built ``.NAME.creating-*`` siblings. Only the holder of the path's lock may
    call this (another writer's temporary files would go with them)."""
    if path.is_dir():
        for leftover in path.rglob("*.partial"):
            leftover.unlink(missing_ok=True)
    for orphan in path.parent.glob(f".{path.name}.creating-*"):
        shutil.rmtree(orphan, ignore_errors=True)


def array_digest(array: np.ndarray) -> int:
    """A non-zero 64-bit digest of an array's dtype, shape and bytes (XXH3)."""
    a = np.ascontiguousarray(array)
    h = xxhash.xxh3_64(f"{a.dtype.str}{a.shape}".encode())
    # numpy declares ndarray's buffer protocol (__buffer__) to type checkers only for Python >= 3.12
    h.update(memoryview(a).cast("B") if a.size else b"")  # type: ignore[arg-type]
    return h.intdigest() or 1


def chunk_digest(*arrays: np.ndarray) -> int:
    """A non-zero 64-bit digest of several arrays together (see ``array_digest``)."""
    if len(arrays) == 1:
        return array_digest(arrays[0])
    return array_digest(np.array([array_digest(a) for a in arrays], dtype=np.uint64))


def group_array(group: zarr.Group, name: str) -> zarr.Array:
    """The array ``group[name]``; ``KeyError`` when it is missing or is a group (a folder
    where an array belongs reads as a missing array)."""
    member = group[name]
    if not isinstance(member, zarr.Array):
        raise KeyError(name)
    return member


def _ledger_chunk_file(array: zarr.Array, index: int) -> str:
    return "/".join(["c", str(index), *("0" * (array.ndim - 1))])


class ChunkLedger:
    """Completion record of ``n_chunks`` chunks made of named parts, kept in the zarr array
    ``group[name]`` of shape (n_chunks, n_parts)."""

    def __init__(self, array: zarr.Array, where: Path | str | zarr.storage.StorePath) -> None:
        self._array = array
        self._where = where
        # a list of str, as ``create`` wrote it
        self.parts: tuple[str, ...] = tuple(cast("Sequence[str]", array.attrs.get("parts", ("data",))))

    @classmethod
    def create(cls, group: zarr.Group, name: str, n_chunks: int, parts: Sequence[str] = ("data",)) -> ChunkLedger:
        """Create an all-pending ledger of ``n_chunks`` rows of ``len(parts)`` digests."""
        array = group.create_array(
            name, shape=(n_chunks, len(parts)), dtype="uint64", chunks=(1, len(parts)), compressors=None,
            fill_value=0, attributes={"parts": list(parts)},
        )
        return cls(array, group.store_path)

    @classmethod
    def open(cls, group: zarr.Group, name: str, where: Path | str) -> ChunkLedger:
        """Open the ledger ``group[name]`` of the output at ``where`` (named in errors)."""
        try:
            array = group_array(group, name)
        except KeyError:
            raise StoreCorruptError(f"{where} is damaged: its ledger {name}/zarr.json is missing") from None
        return cls(array, where)

    @property
    def n_chunks(self) -> int:
        return int(self._array.shape[0])

    def digests(self, first: int = 0, stop: int | None = None) -> np.ndarray:
        """uint64 (n, n_parts) of chunks [first, stop) (default all): each chunk's digests,
        zeros where the chunk is not written. An unreadable row raises ``StoreCorruptError``."""
        try:
            return np.asarray(self._array[first:stop], dtype=np.uint64)
        except ValueError:  # a truncated row file: find it
            stop = self.n_chunks if stop is None else stop
            for index in range(first, stop):
                try:
                    self._array[index]
                except ValueError:
                    raise StoreCorruptError(
                        f"{self._where} is damaged: the ledger entry of chunk {index} "
                        f"({self._array.path}/{_ledger_chunk_file(self._array, index)}) is unreadable; "
                        "delete that file to recompute the chunk"
                    ) from None
            raise

    def done(self, first: int = 0, stop: int | None = None) -> np.ndarray:
        """bool array of chunks [first, stop) (default all): True where complete."""
        return self.digests(first, stop)[:, 0] != 0

    def pending(self) -> list[int]:
        """Indices of the chunks not yet written, in order."""
        return np.nonzero(~self.done())[0].tolist()

    def mark(self, index: int, digests: Sequence[int]) -> None:
        """Record chunk ``index`` as complete with the non-zero digests of its parts."""
        row = np.array([int(d) for d in digests], dtype=np.uint64)
        if row.shape != (len(self.parts),) or not row.all():
            raise InputError(f"chunk {index} needs {len(self.parts)} non-zero digests ({self.parts}), got {list(digests)}")
        self._array[index] = row

    def reset(self, index: int) -> None:
        """Mark chunk ``index`` pending again (its data are to be rewritten)."""
        self._array[index] = np.zeros(len(self.parts), dtype=np.uint64)

    def content_digest(self) -> str:
        """Hex digest of all chunk digests: changes whenever any chunk's data change."""
        return hashlib.blake2b(self.digests().tobytes(), digest_size=16).hexdigest()

