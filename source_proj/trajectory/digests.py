"""Digests of checkpoint contents, and a cache of them keyed by file identity.

A checkpoint's *digest* is the SHA-256 of its state dict (names, dtypes, shapes and values; see
``state_digests``): stores record it, so that features are never mixed across
different weights. Hashing means reading every byte, which for a large model and many
checkpoints costs more than a query, so:

* :class:`FileDigests` remembers, per file, the digests last computed together with the file's
  size and modification time (``mtime_ns``); a file whose size and time are unchanged is not
  read again. A store keeps this cache beside its data (``file_digests.json``), so that queries
  against it do not re-hash; ``verify`` ignores it and re-hashes everything.
* Optimizer-state files (Adam's second moments, ``optimizer_state.Preconditioner``) are cached
  the same way, with the digests of the moments read from them, the step count and the decay
  factor, under a *context* (the attributed parameters and the Adam settings they were read
  with): an unchanged state file is not read to check a store.
* Every time a pass reads a checkpoint it takes the *fast* digest (xxh3-128, at memory speed) of
  what it read and compares it with the one recorded with the SHA-256: a file replaced during a
  run (or replaced with its time preserved) is caught at its next read instead of silently
  mixing two states in one store.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

CACHE_FILE = "file_digests.json"
_CACHE_VERSION = 1


@dataclass(frozen=True)
class StateDigests:
    """The two digests of one state dict: ``sha256`` (recorded in stores) and ``fast``
    (xxh3-128, checked at every read)."""

    sha256: str
    fast: str


def _hash(state: Mapping[str, torch.Tensor], *hashers) -> None:
    # Per tensor (keys sorted): name, dtype and element count, then the raw bytes. Stores record
    # the SHA-256 of exactly this sequence: changing it would make every existing store refuse
    # its own checkpoints.
    for name in sorted(state):
        flat = state[name].detach().cpu().contiguous().reshape(-1)
        header = f"{name}|{flat.dtype}|{tuple(flat.shape)}|".encode()
        data = flat.view(torch.uint8).numpy().data if flat.numel() else b""
        for hasher in hashers:
            hasher.update(header)
            hasher.update(data)


def state_digests(state: Mapping[str, torch.Tensor]) -> StateDigests:
    """Both digests of a state dict, in one pass over its bytes (independent of where it is
    stored, so moving checkpoint files keeps their digests)."""
    slow, fast = hashlib.sha256(), xxhash.xxh3_128()
    _hash(state, slow, fast)
    return StateDigests(slow.hexdigest(), fast.hexdigest())


def fast_digest(state: Mapping[str, torch.Tensor]) -> str:
    """The ``fast`` digest of :func:`state_digests` alone (what each read is checked with)."""
    fast = xxhash.xxh3_128()
    _hash(state, fast)
    return fast.hexdigest()


def _identity(files: Sequence[Path]) -> list[list]:
    """(real path, size, mtime_ns) of each file: what must be unchanged for a cached digest."""
    out = []
    for file in files:
        stat = file.stat()
        out.append([os.path.realpath(file), stat.st_size, stat.st_mtime_ns])
    return out


class FileDigests:
    """Digests of checkpoint files by file identity (a cache: wrong or missing entries only
    cost a re-hash). Keys are the real paths of a checkpoint's files (one file, or the shards
    of a sharded checkpoint); an entry holds when every file has its recorded size and
    modification time."""

    def __init__(self, entries: Mapping[str, dict] | None = None) -> None:
        self.entries: dict[str, dict] = dict(entries or {})

    def get(self, files: Sequence[Path]) -> StateDigests | None:
        """The digests recorded for ``files``, if none of them has changed since."""
        entry = self.entry(files)
        return None if entry is None else StateDigests(entry["sha256"], entry["fast"])

    def entry(self, files: Sequence[Path], context: str = "") -> dict | None:
        """Everything recorded for ``files`` with ``context`` (the digests and the values given
        to :meth:`put`), if none of the files has changed since."""
        try:
            identity = _identity(files)
        except OSError:
            return None
        entry = self.entries.get(identity[0][0])
        if entry is None or entry.get("files") != identity or entry.get("context", "") != context:
            return None
        return entry

    def put(self, files: Sequence[Path], digests: StateDigests, context: str = "", **values: object) -> None:
        """Record the digests of ``files`` as they are now. ``context``: what else the
        recorded values depend on (an entry is only found again with the same context);
        ``values``: more JSON values computed from the files' contents."""
        identity = _identity(files)
        self.entries[identity[0][0]] = {
            "files": identity, "sha256": digests.sha256, "fast": digests.fast,
            **({"context": context} if context else {}), **values,
        }

    @classmethod
    def load(cls, folder: str | os.PathLike) -> FileDigests:
        """The cache kept in ``folder`` (empty if absent or unreadable: it is only a cache)."""
        try:
            data = json.loads((Path(folder) / CACHE_FILE).read_text())
        except (OSError, ValueError):
            return cls()
        if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION or not isinstance(data.get("entries"), dict):
            return cls()
        return cls(data["entries"])

    def save(self, folder: str | os.PathLike) -> None:
        """Write the cache into ``folder`` atomically; a folder that cannot be written is left
        as it is (the next query re-hashes)."""
        text = json.dumps({"version": _CACHE_VERSION, "entries": self.entries}, indent=1)
        write_cache(Path(folder) / CACHE_FILE, lambda temporary: temporary.write_text(text))


def write_cache(target: Path, write: Callable[[Path], object]) -> None:
    """Write a cache file atomically: ``write(temporary)`` then a rename over ``target``. A
    cache only saves work, so a folder that cannot be written is left as it is."""
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, target)
    except OSError:
        temporary.unlink(missing_ok=True)
