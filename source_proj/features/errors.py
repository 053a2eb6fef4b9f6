"""The errors of feature stores and of the outputs written from them, all under ``StoreError``
(itself a ``SourceProjError``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from source_proj.errors import SourceProjError


class StoreError(SourceProjError):
    """Base class of the errors of feature stores and of the outputs written from them."""


class StoreCorruptError(StoreError):
    """Stored data fail their digest check, or a file of the store is missing or unreadable."""


class StoreMismatchError(StoreError, ValueError):
    """An existing store was made with different settings than the ones asked for.

    Attributes:
        field: dotted name of the first differing field, e.g. ``"metadata.projection.seed"``
            or ``"layout.dim"``.
        stored: its value in the store (``None`` if absent there).
        expected: the value asked for (``None`` if absent there).
    """

    def __init__(self, path: Path, field: str, stored: Any, expected: Any) -> None:
        self.field, self.stored, self.expected = field, stored, expected
        super().__init__(
            f"feature store {path} was created with {field} = {stored!r}, but {expected!r} was "
            "asked for; its features would give wrong scores. Use another store path, or delete "
            "this store to recompute it."
        )


class StoreIncompleteError(StoreError, RuntimeError):
    """Features were read from a store whose featurisation has not finished."""


class DataMismatchError(StoreError, ValueError):
    """The training data differ from those a store was made from.

    Attributes:
        chunk: the first store chunk whose rows differ.
        rows: its rows ``(start, stop)``.
    """

    def __init__(self, path: Path, chunk: int, rows: tuple[int, int], n_differing: int, n_checked: int) -> None:
        self.chunk, self.rows = chunk, rows
        super().__init__(
            f"the training data differ from those feature store {path} was made from: the inputs or targets "
            f"of chunk {chunk} (rows {rows[0]}-{rows[1] - 1}) changed, the first of {n_differing} differing "
            f"chunks among the {n_checked} checked (rows reordered, relabelled or replaced?); the store's "
            "features belong to the old data. Use "
            "the original data, or another store path (or delete this store) to attribute the new data"
        )
