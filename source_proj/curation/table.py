"""The curation table: one row per training row, pandas-free, written to CSV or Parquet.

Columns (each an (N,) numpy array, in training-row order):

- ``row_id`` (int64): the training row (0-based, as in the feature store);
- ``label`` (optional): the row's training label;
- ``score`` (float64): the suspicion score it was ranked by (larger = more suspicious);
- ``rank`` (int64): 1 for the most suspicious row;
- ``flag`` (bool): among the flagged fraction (dropped by :meth:`CurationTable.keep_mask`);
- ``weight`` (float64): a per-row weight in [floor, 1] for a weighted sampler or loss;
- optional signal columns the score came from: ``self_influence``, ``loss``,
  ``heldout_loss``, ``harm``.

Files list the rows by rank (most suspicious first); reading one restores row order.
Parquet needs ``pyarrow`` (imported only when used).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from source_proj.errors import InputError

REQUIRED = ("row_id", "score", "rank", "flag", "weight")
SIGNALS = ("self_influence", "loss", "heldout_loss", "harm")
_ORDER = ("row_id", "label", "score", "rank", "flag", "weight", *SIGNALS)
_KINDS = {"row_id": "int", "rank": "int", "flag": "bool", "label": "label", **{c: "float" for c in ("score", "weight", *SIGNALS)}}


def _parquet() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as exc:
        raise ImportError(
            "Parquet files need pyarrow: pip install 'source-proj[parquet]' (or pyarrow); CSV needs nothing"
        ) from exc
    return pyarrow


@dataclass(frozen=True)
class CurationTable:
    """Per-row curation results (see the module docstring for the columns).

    Attributes:
        columns: column name -> (N,) array, rows in training-row order (``row_id`` = 0..N-1).
        ranking: the ranking the scores come from ("heldout_loss", ...); None when read
            from a file.
    """

    columns: Mapping[str, np.ndarray]
    ranking: str | None = None

    def __post_init__(self) -> None:
        missing = [c for c in REQUIRED if c not in self.columns]
        unknown = sorted(set(self.columns) - set(_ORDER))
        if missing or unknown:
            raise InputError(f"curation table columns: missing {missing}, unknown {unknown}; allowed {list(_ORDER)}")
        cols = {name: np.asarray(self.columns[name]) for name in _ORDER if name in self.columns}
        n = cols["row_id"].shape[0]
        bad = [f"{k} {v.shape}" for k, v in cols.items() if v.shape != (n,)]
        if bad:
            raise InputError(f"every curation column must have shape ({n},); got {bad}")
        if not np.array_equal(cols["row_id"], np.arange(n)):
            raise InputError("curation table rows must be in training-row order (row_id = 0..N-1)")
        object.__setattr__(self, "columns", cols)

    def __len__(self) -> int:
        return int(self.columns["row_id"].shape[0])

    def column(self, name: str) -> np.ndarray:
        """The (N,) array of column ``name``."""
        if name not in self.columns:
            raise KeyError(f"no column {name!r}; the table has {list(self.columns)}")
        return self.columns[name]

    def keep_mask(self) -> np.ndarray:
        """(N,) bool: True for the rows to keep (every row not flagged). ``np.flatnonzero``
        of it gives the indices for a ``torch.utils.data.Subset``."""
        return ~self.columns["flag"]

    def weights(self) -> np.ndarray:
        """(N,) float64 per-row weights in [weight_floor, 1]: pass them to
        ``torch.utils.data.WeightedRandomSampler`` or multiply the per-example loss."""
        return self.columns["weight"]

    def flagged(self) -> np.ndarray:
        """int64 row ids of the flagged rows, most suspicious first."""
        order = np.argsort(self.columns["rank"], kind="stable")
        return order[self.columns["flag"][order]].astype(np.int64)

    def to_records(self) -> list[dict[str, Any]]:
        """The rows as dicts of Python scalars, most suspicious first."""
        order = np.argsort(self.columns["rank"], kind="stable")
        names = list(self.columns)
        return [{name: self.columns[name][i].item() for name in names} for i in order]

    # --------------------------------------------------------------------------------- files
    def write(self, path: str | os.PathLike) -> Path:
        """Write to ``path``: Parquet if it ends in ``.parquet``, else CSV. Returns the path."""
        path = Path(path)
        if path.suffix == ".parquet":
            pa = _parquet()
            order = np.argsort(self.columns["rank"], kind="stable")
            table = pa.table({name: values[order] for name, values in self.columns.items()})
            pa.parquet.write_table(table, path)
            return path
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(list(self.columns))
            for record in self.to_records():
                writer.writerow([_text(v) for v in record.values()])
        return path

    @classmethod
    def read(cls, path: str | os.PathLike) -> CurationTable:
        """Read a table written by :meth:`write` (CSV or ``.parquet``), back in row order."""
        path = Path(path)
        if path.suffix == ".parquet":
            pa = _parquet()
            raw = {name: np.asarray(col) for name, col in pa.parquet.read_table(path).to_pydict().items()}
        else:
            with open(path, newline="") as handle:
                reader = csv.reader(handle)
                header = next(reader, None)
                if header is None:
                    raise InputError(f"{path} is empty; expected a curation table")
                rows = list(reader)
            text = {name: [r[i] for r in rows] for i, name in enumerate(header)}
            unknown = sorted(set(header) - set(_KINDS))
            if unknown:
                raise InputError(f"{path}: unknown curation columns {unknown}")
            raw = {name: _parse(values, _KINDS[name], name, path) for name, values in text.items()}
        if "row_id" not in raw:
            raise InputError(f"{path} has no row_id column; expected a curation table")
        order = np.argsort(np.asarray(raw["row_id"], dtype=np.int64), kind="stable")
        return cls({name: np.asarray(values)[order] for name, values in raw.items()})


def _text(value: Any) -> str:
    # repr of a float is the shortest string that reads back to the same float
    return repr(value) if isinstance(value, float) else str(value)


def _parse(values: list[str], kind: str, name: str, path: Path) -> np.ndarray:
    try:
        if kind == "int":
            return np.asarray([int(v) for v in values], dtype=np.int64)
        if kind == "float":
            return np.asarray([float(v) for v in values], dtype=np.float64)
        if kind == "bool":
            if set(values) - {"True", "False"}:
                raise InputError("expected True or False")
            return np.asarray([v == "True" for v in values], dtype=bool)
    except ValueError as exc:
        raise InputError(f"{path}: column {name!r}: {exc}") from exc
    try:  # labels: integers when they all are, else text
        return np.asarray([int(v) for v in values], dtype=np.int64)
    except ValueError:
        return np.asarray(values)
