"""Writing a curation run's files together: all of them or none.

:func:`write_curation` writes the table (``curation.csv`` or ``.parquet``), ``keep.npy`` and
``weights.npy`` through :func:`write_together`: every file goes to a temporary beside its
destination, each is synced once written, and only when all are written are they renamed
into place, one ``os.replace`` each. A failure while writing (a full disk, a destination that
is a folder) removes the temporaries and leaves the previous outputs byte for byte as they
were, never a truncated table beside the keep-mask and weights of an earlier run.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from source_proj.curation.table import CurationTable
from source_proj.errors import InputError

Writer = Callable[[Path], object]  # the return value (if any) is ignored


def _temporary(destination: Path) -> Path:
    # Same folder (so the rename stays on one file system), same suffix (writers such as
    # CurationTable.write and np.save go by it), hidden.
    return destination.with_name(f".{destination.stem}.{uuid.uuid4().hex[:12]}.partial{destination.suffix}")


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_together(writers: Mapping[Path, Writer]) -> None:
    """Write each destination file with ``writers[destination](temporary_path)``, then move
    them all into place once every one is written and synced.

    Raises ``IsADirectoryError`` before writing anything when a destination is a folder, and
    ``OSError`` naming the file when writing one fails (e.g. ``ENOSPC``, a full disk); in
    both cases no destination is touched and no temporary is left behind.
    """
    folders = [d for d in writers if d.is_dir()]
    if folders:
        raise IsADirectoryError(
            f"cannot replace {folders[0]}: it is a folder; move it away (the previous outputs are unchanged)"
        )
    temporaries = {destination: _temporary(destination) for destination in writers}
    try:
        for destination, write in writers.items():
            try:
                write(temporaries[destination])
                _sync(temporaries[destination])
            except OSError as exc:
                raise OSError(
                    exc.errno, f"writing {destination} failed ({exc.strerror or exc}); the previous outputs are unchanged"
                ) from exc
        for destination, temporary in temporaries.items():
            os.replace(temporary, destination)
    finally:
        for temporary in temporaries.values():
            temporary.unlink(missing_ok=True)
    for folder in {d.parent for d in writers}:
        _sync(folder)  # the renames themselves


def write_curation(table: CurationTable, folder: str | os.PathLike, fmt: str = "csv") -> dict[str, Path]:
    """Write ``table`` to ``folder`` as ``curation.{fmt}`` (csv or parquet), its keep-mask as
    ``keep.npy`` (bool) and its weights as ``weights.npy`` (float64), all or none (see
    :func:`write_together`). Returns {"table", "keep", "weights"} -> path."""
    if fmt not in ("csv", "parquet"):
        raise InputError(f"the curation table is written as csv or parquet, not {fmt!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"table": folder / f"curation.{fmt}", "keep": folder / "keep.npy", "weights": folder / "weights.npy"}
    write_together({
        paths["table"]: table.write,
        paths["keep"]: lambda path: np.save(path, table.keep_mask()),
        paths["weights"]: lambda path: np.save(path, table.weights()),
    })
    return paths
