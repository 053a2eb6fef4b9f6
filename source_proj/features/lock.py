"""An exclusive lock on an output path (a feature store, a bulk score output) for its writers.

The lock is the file ``<path>.lock`` beside the output (the output itself may not exist yet:
it is created under the lock). It is held with ``fcntl.flock``, which the kernel releases when
the holding process dies, however it dies, so a killed writer never blocks the next one. The
file records who holds it, as JSON: process id, host name, a run id and the start time; a
writer that finds the lock taken raises ``StoreLockedError`` saying who holds it, and one that
finds a record left by a dead holder (a stale lock: the kernel lock is gone but the file is
there) takes it over and reports the dead holder in ``StoreLock.replaced``.

A lock is held by one process for one run id. ``hold_lock`` is re-entrant within a thread:
nested calls for the same path share the outermost lock, so a function that locks its output
can be called by one that already holds it (``fit_store`` holds the lock of its store over
the whole fit, and ``featurize`` inside it finds it held); another thread, like another
process, is refused. For cooperating processes (one holds the lock for a group of writers
that share its run id), ``check_holder`` verifies that the lock is held for a given run id
before a member of the group writes.

The outermost acquisition also removes what dead writers left in the output
(temporary files of interrupted writes, half-created folders): only the lock holder may.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from source_proj.features.errors import StoreError
from source_proj.features.ledger import remove_leftovers


class StoreLockedError(StoreError):
    """Another writer holds the lock of an output. Attributes: ``path`` and ``holder``
    (a ``LockHolder``, or None if the lock file could not be read)."""

    def __init__(self, path: Path, holder: LockHolder | None) -> None:
        self.path, self.holder = path, holder
        who = holder.describe() if holder is not None else "another process"
        super().__init__(
            f"{path} is being written by {who} (lock file {lock_path(path)}); wait for it to finish, or "
            "stop it, then run again (a killed writer releases the lock by itself)"
        )


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or held) a lock: process id, host name, run id and start time (Unix s)."""

    pid: int
    host: str
    run_id: str
    since: float

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"process {self.pid} on {self.host} (run {self.run_id}, since {started})"


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of the output ``path``: ``<path>.lock`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


def read_holder(path: str | os.PathLike) -> LockHolder | None:
    """The holder recorded in the lock file of ``path`` (None if there is none or it is
    unreadable). The record may be stale: only a failed acquisition proves it is held."""
    try:
        return LockHolder(**json.loads(lock_path(path).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _holder_of_taken_lock(path: Path) -> LockHolder | None:
    """The holder of a lock found taken; its record may be a moment away (the holder writes
    it just after taking the lock), so an empty record is read again for up to a second."""
    for _ in range(20):
        holder = read_holder(path)
        if holder is not None:
            return holder
        time.sleep(0.05)
    return read_holder(path)


class StoreLock:
    """The exclusive lock of the output ``path`` (see the module docstring).

    Use as a context manager (``with StoreLock(path):``), or ``acquire``/``release``.

    Attributes:
        path: the output.
        run_id: the run that holds it (random unless given).
        replaced: the holder of a stale lock that this one took over, else None.
    """

    def __init__(self, path: str | os.PathLike, run_id: str | None = None) -> None:
        self.path = Path(path)
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.replaced: LockHolder | None = None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> StoreLock:
        """Take the lock, or raise ``StoreLockedError`` naming its holder (never waits)."""
        if self._fd is not None:
            raise RuntimeError(f"the lock of {self.path} is already held by this object")
        target = lock_path(self.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise StoreLockedError(self.path, _holder_of_taken_lock(self.path)) from None
                raise
            # The holder before us may have deleted the file after we opened it: then we
            # locked a file nobody else sees, and must start again.
            try:
                same = os.stat(target).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = os.read(fd, 1 << 16)
        if previous:
            try:
                self.replaced = LockHolder(**json.loads(previous))
            except (ValueError, TypeError):
                self.replaced = None
        me = LockHolder(os.getpid(), socket.gethostname(), self.run_id, time.time())
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(asdict(me)).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock back (and delete the lock file)."""
        if self._fd is None:
            return
        try:
            lock_path(self.path).unlink(missing_ok=True)  # while still holding it: see acquire
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


_held: dict[tuple[int, Path], tuple[StoreLock, int]] = {}
_held_guard = threading.Lock()


@contextmanager
def hold_lock(path: str | os.PathLike, run_id: str | None = None) -> Iterator[StoreLock]:
    """Hold the lock of ``path`` for the ``with`` block; re-entrant within a thread (a
    nested call yields the outer lock). The outermost acquisition removes the leftovers of
    dead writers of ``path`` (``remove_leftovers``)."""
    key = (threading.get_ident(), Path(os.path.abspath(path)))
    with _held_guard:
        if key in _held:
            lock, depth = _held[key]
            _held[key] = (lock, depth + 1)
            outer = False
        else:
            lock = StoreLock(key[1], run_id).acquire()
            _held[key] = (lock, 1)
            outer = True
    try:
        if outer:
            remove_leftovers(key[1])
        yield lock
    finally:
        with _held_guard:
            lock, depth = _held[key]
            if depth > 1:
                _held[key] = (lock, depth - 1)
            else:
                del _held[key]
                lock.release()


def check_holder(path: str | os.PathLike, run_id: str) -> LockHolder:
    """Raise ``StoreError`` unless the lock of ``path`` is held for run ``run_id``: what a
    member of a group of cooperating writers checks before writing. Returns the holder."""
    holder = read_holder(path)
    if holder is None or holder.run_id != run_id:
        who = holder.describe() if holder is not None else "nobody"
        raise StoreError(f"{path} is not locked for run {run_id}: its lock is held by {who}")
    try:
        fd = os.open(lock_path(path), os.O_RDONLY)
    except FileNotFoundError:
        fd = None
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # fails while the holder lives
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return holder
            raise
        finally:
            os.close(fd)  # (also drops the probe's own lock, leaving the record as it was)
    raise StoreError(f"{path} is not locked for run {run_id}: its holder {holder.describe()} has ended")
