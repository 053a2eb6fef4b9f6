"""Crash-safe building blocks of resumable zarr outputs: atomic creation, completion ledger.

``create_group_atomically`` builds a group's skeleton in a temporary sibling directory and
renames it into place, so a crash leaves either nothing or a complete empty group. A ledger is a zarr array of uint64 with one element per row chunk, each element in its own
zarr chunk (one small file). After a chunk's data have been written, its element is set to a
digest of those data; 0 means "not written yet". zarr's local store writes every file
through a temporary file and a rename, so a process killed at any instant leaves each element
either 0 or a complete digest, and the data of a chunk whose digest is set are complete.
The digests also fingerprint the content (see ``ChunkLedger.content_digest``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zarr


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


def remove_partial_writes(path: Path) -> None:
    """Delete the temporary files of chunk writes that a killed process left under ``path``."""
    for leftover in path.rglob("*.partial"):
        leftover.unlink(missing_ok=True)


def chunk_digest(*arrays: np.ndarray) -> int:
    """A non-zero 63-bit digest of ``arrays``: the CRC-32 of their shapes, dtypes and bytes,
    and their total size. It detects accidental change, fast (GB/s); it is not cryptographic."""
    crc, size = 0, 0
    for a in arrays:
        a = np.ascontiguousarray(a)
        crc = zlib.crc32(a.data, zlib.crc32(f"{a.dtype.str}{a.shape}".encode(), crc))
        size += a.nbytes
    return ((size & 0x7FFFFFFF) << 32 | crc) or 1


class ChunkLedger:
    """Completion record of ``n_chunks`` chunks, kept in the zarr array ``group[name]``."""

    def __init__(self, array: zarr.Array) -> None:
        self._array = array

    @classmethod
    def create(cls, group: zarr.Group, name: str, n_chunks: int) -> ChunkLedger:
        """Create an all-pending ledger of ``n_chunks`` entries in ``group``."""
        array = group.create_array(
            name, shape=(n_chunks,), dtype="uint64", chunks=(1,), compressors=None, fill_value=0
        )
        return cls(array)

    @classmethod
    def open(cls, group: zarr.Group, name: str) -> ChunkLedger:
        """Open the ledger ``group[name]``."""
        return cls(group[name])

    @property
    def n_chunks(self) -> int:
        return int(self._array.shape[0])

    def digests(self, first: int = 0, stop: int | None = None) -> np.ndarray:
        """uint64 array of chunks [first, stop) (default all): each chunk's digest, 0 where
        the chunk is not written."""
        return np.asarray(self._array[first:stop], dtype=np.uint64)

    def done(self, first: int = 0, stop: int | None = None) -> np.ndarray:
        """bool array of chunks [first, stop) (default all): True where complete."""
        return self.digests(first, stop) != 0

    def pending(self) -> list[int]:
        """Indices of the chunks not yet written, in order."""
        return np.nonzero(~self.done())[0].tolist()

    def mark(self, index: int, digest: int) -> None:
        """Record chunk ``index`` as complete with the non-zero ``digest`` of its data."""
        if digest == 0:
            raise ValueError("a chunk digest must be non-zero (0 means 'pending')")
        self._array[index] = np.uint64(digest)

    def content_digest(self) -> str:
        """Hex digest of all chunk digests: changes whenever any chunk's data change."""
        return hashlib.blake2b(self.digests().tobytes(), digest_size=16).hexdigest()
