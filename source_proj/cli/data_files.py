"""Data files for the command line (``--train`` / ``--queries`` with ``--run``) read as rows a
Hugging Face model takes.

Accepted: a folder written by ``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` folder
with one split), a JSON-lines file (``.jsonl``; ``.json`` holding one object per line or a
list of objects), a CSV file (``.csv``), a Parquet file (``.parquet``), or a folder of such
files of one format (read in name order, row ids running on across them).

Rows hold either text (``--text-column``, default ``text``), tokenised with the run's own
tokenizer (truncated to ``--max-length``), or token ids already (an ``input_ids`` column; in
CSV, written as a JSON list such as ``[3, 1, 4]``). Targets follow the task:

* causal LM: the token ids themselves (a ``labels`` column of token ids is used where given,
  e.g. with -100 over a prompt);
* sequence classification: the ``--label-column`` (default ``label``, else ``labels``) holding
  class indices or class names of the model's ``config.label2id``;
* token classification: the label column holding one label per token (-100 where not
  trained on), as long as the row's tokens.

A missing column, a label the model does not know, or a token-label list of the wrong length
is an :class:`InputError` naming the file, the column or row, and what is there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from source_proj.errors import InputError

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
TASK_TYPES = ("causal_lm", "sequence_classification", "token_classification")
_DEFAULT_LABELS = ("label", "labels")


@dataclass(frozen=True)
class Rows:
    """Rows ready for the attributor.

    Attributes:
        columns: ``input_ids`` (one list of ids per row), ``attention_mask`` and, except for a
            causal LM without a labels column, ``labels``: a dict of columns (row i is id i).
        texts: one readable string per row: its tokens decoded (what the model saw), else its
            text, else its ids.
        source: the file or folder the rows came from (for messages).
    """

    columns: dict[str, list]
    texts: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.texts)

    def dataset(self) -> Any:
        """A ``datasets.Dataset`` of the columns and a ``text`` column of the texts (not passed
        to the model: it is not numeric)."""
        import datasets

        return datasets.Dataset.from_dict({**self.columns, "text": self.texts})


def _disk_dataset(folder: Path) -> dict[str, list]:
    import datasets

    loaded = datasets.load_from_disk(str(folder))
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            raise InputError(f"{folder} is a DatasetDict with splits {sorted(loaded)}: give one split's folder, "
                             f"e.g. {folder / sorted(loaded)[0]}")
        loaded = next(iter(loaded.values()))
    return loaded.to_dict()


def _json_rows(path: Path) -> list[dict]:
    text = path.read_text()
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not JSON lines (one object per line): {exc}") from exc
    if not all(isinstance(r, dict) for r in rows):
        raise InputError(f"{path}: every row must be a JSON object (column name -> value)")
    return rows


def _file_columns(path: Path) -> dict[str, list]:
    kind = FORMATS.get(path.suffix.lower())
    if kind == "json":
        rows = _json_rows(path)
        names = list(dict.fromkeys(k for r in rows for k in r))
        return {k: [r.get(k) for r in rows] for k in names}
    if kind == "csv":
        import pandas as pd

        try:
            frame = pd.read_csv(path)
        except (ValueError, pd.errors.ParserError) as exc:
            raise InputError(f"cannot read {path} as CSV: {exc}") from exc
        return {str(k): frame[k].tolist() for k in frame.columns}
    if kind == "parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pydict()
        except pyarrow.ArrowException as exc:
            raise InputError(f"cannot read {path} as Parquet: {exc}") from exc
    raise InputError(f"{path}: unknown data file type {path.suffix!r}; use one of {sorted(FORMATS)} or a "
                     "datasets.save_to_disk folder")


def read_columns(path: str | Path) -> dict[str, list]:
    """The columns (name -> one value per row) of a data file or folder (see the module
    docstring for the formats)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"data file {path} does not exist")
    if path.is_file():
        return _file_columns(path)
    if any((path / name).exists() for name in ("state.json", "dataset_dict.json", "dataset_info.json")):
        return _disk_dataset(path)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FORMATS)
    if not files:
        raise InputError(f"{path} is neither a datasets.save_to_disk folder nor a folder of {sorted(FORMATS)} files")
    if len({FORMATS[p.suffix.lower()] for p in files}) > 1:
        raise InputError(f"{path} mixes data file formats ({[p.name for p in files]}): keep one format per folder")
    parts = [_file_columns(p) for p in files]
    for part, file in zip(parts[1:], files[1:]):
        if set(part) != set(parts[0]):
            raise InputError(f"{file} has columns {sorted(part)}, but {files[0]} has {sorted(parts[0])}")
    return {k: [v for part in parts for v in part[k]] for k in parts[0]}


def _id_list(value: Any, column: str, row: int, source: str) -> list[int]:
    """A row's token ids (or token labels): a list, or a JSON list in a string (CSV)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, Sequence) or isinstance(value, str) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise InputError(f"{source}: row {row} of column {column!r} is not a list of integers ({str(value)[:60]!r})")
    return list(value)


def _column(columns: Mapping[str, list], name: str, source: str, what: str) -> list:
    if name not in columns:
        raise InputError(f"{source} has no {what} column {name!r}; its columns are {sorted(columns)}")
    return columns[name]


def _class_index(value: Any, label2id: Mapping[str, int], num_labels: int, row: int, source: str, column: str) -> int:
    if isinstance(value, str) and value in label2id:
        return int(label2id[value])
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < num_labels:
        return value
    raise InputError(f"{source}: row {row} of column {column!r} is {value!r}, not a class of the model (indices "
                     f"0..{num_labels - 1} or names {sorted(label2id)})")


def _label_column(columns: Mapping[str, list], label_column: str | None, source: str) -> str:
    if label_column is not None:
        _column(columns, label_column, source, "label")
        return label_column
    found = next((name for name in _DEFAULT_LABELS if name in columns), None)
    if found is None:
        raise InputError(f"{source} has no label column ('label' or 'labels'; name another with --label-column); "
                         f"its columns are {sorted(columns)}")
    return found


def tokenised_rows(
    path: str | Path,
    tokenizer: Any | None,
    task_type: str,
    *,
    text_column: str = "text",
    label_column: str | None = None,
    max_length: int | None = None,
    label2id: Mapping[str, int] | None = None,
    num_labels: int = 0,
) -> Rows:
    """The rows of the data file or folder ``path`` for a model of ``task_type`` (one of
    ``TASK_TYPES``), tokenised with ``tokenizer`` (``None``: the rows must hold ``input_ids``).

    Args:
        text_column: the column of text to tokenise (used where the rows hold no
            ``input_ids``).
        label_column: the targets' column (see the module docstring for the default).
        max_length: tokens kept per row (truncation; token labels are cut alike).
        label2id, num_labels: the classes of a classifier (its config's).
    """
    if task_type not in TASK_TYPES:
        raise InputError(f"unknown task type {task_type!r}; use one of {list(TASK_TYPES)}")
    source = str(path)
    columns = read_columns(path)
    n = len(next(iter(columns.values()), []))
    if n == 0:
        raise InputError(f"{source} holds no rows")
    if "input_ids" in columns:
        ids = [_id_list(v, "input_ids", i, source)[:max_length] for i, v in enumerate(columns["input_ids"])]
    elif tokenizer is None:
        raise InputError(f"{source} has no 'input_ids' column and the run saved no tokenizer to tokenise its "
                         f"{text_column!r} column (save it with Trainer(processing_class=tokenizer))")
    else:
        texts = _column(columns, text_column, source, "text (--text-column)")
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise InputError(f"{source}: row {bad} of the text column {text_column!r} is not text ({texts[bad]!r})")
        encoded = tokenizer(texts, truncation=max_length is not None, max_length=max_length)
        ids = [list(map(int, row)) for row in encoded["input_ids"]]
    empty = [i for i, row in enumerate(ids) if not row]
    if empty:
        raise InputError(f"{source}: rows {empty[:10]} have no tokens")
    out: dict[str, list] = {"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]}
    if task_type == "causal_lm":
        name = label_column or ("labels" if "labels" in columns else None)
        if name is not None:
            out["labels"] = [_id_list(v, name, i, source)[:max_length]
                             for i, v in enumerate(_column(columns, name, source, "label"))]
    elif task_type == "sequence_classification":
        name = _label_column(columns, label_column, source)
        out["labels"] = [_class_index(v, label2id or {}, num_labels, i, source, name) for i, v in enumerate(columns[name])]
    else:
        name = _label_column(columns, label_column, source)
        out["labels"] = [_id_list(v, name, i, source)[:max_length] for i, v in enumerate(columns[name])]
    for i, (row_ids, labels) in enumerate(zip(ids, out.get("labels", ids))):
        if isinstance(labels, list) and len(labels) != len(row_ids):
            raise InputError(f"{source}: row {i} has {len(row_ids)} tokens but {len(labels)} labels in column {name!r} "
                             "(one label per token, -100 where not trained on)")
    return Rows(out, _display_texts(ids, columns, text_column, tokenizer), source)


def _display_texts(ids: list[list[int]], columns: Mapping[str, list], text_column: str, tokenizer: Any | None) -> list[str]:
    if tokenizer is not None:
        return [tokenizer.decode(row, skip_special_tokens=True) for row in ids]
    if text_column in columns:
        return [str(t) for t in columns[text_column]]
    return [" ".join(map(str, row)) for row in ids]
