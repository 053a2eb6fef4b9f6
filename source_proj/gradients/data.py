"""Indexable examples from tensors, datasets, data loaders and dict rows.

Attribution addresses training rows by index (chunks, stores, top-k ids), so every input is
normalised to :class:`Examples`: ``len`` and ``rows(start, stop) -> (inputs, targets)``.

Accepted data:

* ``(inputs, targets)``: tensors (first dim N); inputs a tensor, a tuple of tensors
  (positional forward arguments) or a dict of tensors (keyword arguments).
* a map-style ``Dataset`` of ``(input, target)`` items or of dicts, or a ``DataLoader`` (its
  dataset, in index order, batched with its ``collate_fn`` when it has its own, e.g. a
  Hugging Face data collator);
* a Hugging Face ``datasets.Dataset`` or a dict of equal-length columns.

Dict rows (keyword inputs): the target is the ``target_key`` column (default ``"labels"``,
else ``"label"``); without one, rows with ``input_ids`` are causal-LM rows whose targets are
the input ids. Sequences of different lengths are padded on the right to the longest of the
chunk (labels with -100, ``attention_mask`` with 0, other keys with 0) and an
``attention_mask`` is added if there was none. Token targets (the shape of
``attention_mask``) are set to -100 wherever the mask is 0, so padding is never trained on.
Columns that are not numeric (e.g. a ``"text"`` column) are not passed to the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from source_proj.errors import InputError
from source_proj.gradients.model import Inputs, take_rows

IGNORE_INDEX = -100
TARGET_KEYS = ("labels", "label")
PAD_VALUES = {"labels": IGNORE_INDEX, "label": IGNORE_INDEX, "attention_mask": 0}


def _is_columnar(data: Any) -> bool:
    """A dict of columns, or a Hugging Face ``datasets.Dataset`` (duck-typed: no import)."""
    return isinstance(data, Mapping) or (hasattr(data, "column_names") and hasattr(data, "__getitem__"))


def _numeric(value: Any) -> bool:
    while isinstance(value, (list, tuple)) and value:
        value = value[0]
    return isinstance(value, (torch.Tensor, int, float, bool)) or hasattr(value, "dtype")


def _column_tensor(key: str, values: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(tensor, lengths or None): a column as one tensor, ragged sequences padded on the right."""
    if isinstance(values, torch.Tensor):
        return values, None
    rows = [torch.as_tensor(v) for v in values]
    if all(r.dim() >= 1 for r in rows) and len({r.shape[0] for r in rows}) > 1:
        lengths = torch.tensor([r.shape[0] for r in rows])
        padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=PAD_VALUES.get(key, 0))
        return padded, lengths
    return torch.stack(rows), None


def split_columns(columns: Mapping[str, Any], target_key: str | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(keyword inputs, targets) from a batch of dict rows given as columns (see the module
    docstring for the conventions). Raises ValueError if no target can be found."""
    tensors: dict[str, torch.Tensor] = {}
    lengths = None
    for column, values in columns.items():
        if not _numeric(values):
            continue
        tensors[column], padded = _column_tensor(column, values)
        lengths = padded if padded is not None else lengths
    if lengths is not None and "attention_mask" not in tensors:
        width = max(t.shape[1] for t in tensors.values() if t.dim() >= 2)
        tensors["attention_mask"] = (torch.arange(width)[None, :] < lengths[:, None]).long()
    key = target_key or next((k for k in TARGET_KEYS if k in tensors), None)
    if key is not None and key in tensors:
        targets = tensors.pop(key)
    elif key is None and "input_ids" in tensors:
        targets = tensors["input_ids"].clone()
    elif target_key is not None:
        raise InputError(f"dict rows with keys {sorted(columns)} have no numeric target column {target_key!r}")
    else:
        raise InputError(
            f"dict rows with keys {sorted(columns)} have no target column ('labels' or 'label') and no "
            "'input_ids' to use as causal-LM targets; pass target_key="
        )
    mask = tensors.get("attention_mask")
    if mask is not None and targets.shape == mask.shape:
        targets = torch.where(mask == 0, IGNORE_INDEX, targets)
    return tensors, targets


def _to_device(inputs: Inputs, device: torch.device | str) -> Inputs:
    if isinstance(inputs, Mapping):
        return {k: v.to(device) for k, v in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(x.to(device) for x in inputs)
    return inputs.to(device)


def _tensors(inputs: Inputs) -> tuple[torch.Tensor, ...]:
    return tuple(inputs.values()) if isinstance(inputs, Mapping) else inputs if isinstance(inputs, tuple) else (inputs,)


def _first_len(inputs: Inputs) -> set[int]:
    return {int(x.shape[0]) for x in _tensors(inputs)}


def row_shapes(inputs: Inputs) -> str:
    """The shape of one row of each input of a batch, for messages: "(5,)" for a tensor,
    "input_ids (7,), attention_mask (7,)" for keyword inputs."""
    names = list(inputs) if isinstance(inputs, Mapping) else [""] * len(_tensors(inputs))
    return ", ".join(f"{name} {tuple(x.shape[1:])}".strip() for name, x in zip(names, _tensors(inputs)))


@dataclass(frozen=True)
class Examples:
    """A row-addressable data set.

    Attributes:
        inputs, targets: tensors with first dimension N (inputs a tensor, tuple or dict).
        dataset: instead, a map-style dataset of items ((input, target) or dicts), a
            ``datasets.Dataset`` or a dict of columns.
        collate: turns a list of ``dataset`` items into a batch (e.g. a data loader's
            ``collate_fn``); by default tuples go through ``default_collate`` and dicts are
            padded and split as the module docstring says.
        target_key: the target column of dict rows (default "labels", then "label").
    """

    inputs: Inputs | None = None
    targets: torch.Tensor | None = None
    dataset: Any = None
    collate: Callable[[list], Any] | None = None
    target_key: str | None = None

    def _tensors(self) -> tuple[Inputs, torch.Tensor]:
        """(inputs, targets) of examples given as tensors (``dataset`` None)."""
        assert self.inputs is not None and self.targets is not None, "as_examples gives tensors or a dataset"
        return self.inputs, self.targets

    def __len__(self) -> int:
        if self.dataset is None:
            return int(self._tensors()[1].shape[0])
        if isinstance(self.dataset, Mapping):
            return len(next(iter(self.dataset.values())))
        return len(self.dataset)

    def rows(self, start: int, stop: int, device: torch.device | str = "cpu") -> tuple[Inputs, torch.Tensor]:
        """Rows [start, stop) as (inputs, targets) on ``device``."""
        return self.take(range(start, stop), device)

    def _batch(self, indices: Sequence[int]) -> Any:
        if isinstance(self.dataset, Mapping):
            idx = torch.as_tensor(indices, dtype=torch.long)
            return {
                k: v[idx] if isinstance(v, torch.Tensor) else [v[int(i)] for i in indices]
                for k, v in self.dataset.items()
            }
        if _is_columnar(self.dataset) and self.collate is None:
            return self.dataset[[int(i) for i in indices]]  # datasets.Dataset: a dict of columns
        items = [self.dataset[int(i)] for i in indices]
        if self.collate is not None:
            return self.collate(items)
        if items and isinstance(items[0], Mapping):
            return {k: [item[k] for item in items] for k in items[0]}
        return default_collate(items)

    def take(self, indices: Sequence[int], device: torch.device | str = "cpu") -> tuple[Inputs, torch.Tensor]:
        """Rows at ``indices`` as (inputs, targets) on ``device``."""
        if self.dataset is None:
            idx = torch.as_tensor(list(indices), dtype=torch.long)
            inputs, targets = self._tensors()
            inputs, targets = take_rows(inputs, idx), targets[idx]
        else:
            batch = self._batch(list(indices))
            if isinstance(batch, Mapping):
                inputs, targets = split_columns(batch, self.target_key)
            elif isinstance(batch, (tuple, list)) and len(batch) == 2:
                inputs, targets = batch
            else:
                raise TypeError(
                    f"dataset rows must be (input, target) pairs or dicts of tensors, got a batch of type "
                    f"{type(batch).__name__}"
                )
        if isinstance(inputs, list):
            inputs = tuple(inputs)
        return _to_device(inputs, device), torch.as_tensor(targets).to(device)


def as_examples(data: Any, what: str = "training data", target_key: str | None = None) -> Examples:
    """Normalise any accepted data (see the module docstring) to :class:`Examples`.

    Raises ValueError for an empty data set or mismatched lengths, TypeError for anything else.
    """
    if isinstance(data, Examples):
        examples = data
    elif isinstance(data, DataLoader):
        collate = None if data.collate_fn is default_collate else data.collate_fn
        examples = Examples(dataset=data.dataset, collate=collate, target_key=target_key)
    elif _is_columnar(data):
        if isinstance(data, Mapping) and len({len(v) for v in data.values()}) > 1:
            raise InputError(f"{what}: columns have different lengths {({k: len(v) for k, v in data.items()})}")
        examples = Examples(dataset=data, target_key=target_key)
    elif isinstance(data, Dataset) and not isinstance(data, tuple):
        examples = Examples(dataset=data, target_key=target_key)
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        inputs, targets = data
        inputs = tuple(inputs) if isinstance(inputs, list) else inputs
        targets = torch.as_tensor(targets)
        lengths = _first_len(inputs)
        if lengths != {int(targets.shape[0])}:
            raise InputError(f"{what}: inputs and targets have different lengths ({sorted(lengths)} vs {targets.shape[0]})")
        examples = Examples(inputs=inputs, targets=targets)
    else:
        raise TypeError(
            f"{what}: expected (inputs, targets) tensors, a Dataset, a DataLoader, a datasets.Dataset or a "
            f"dict of columns, got {type(data).__name__}"
        )
    if len(examples) == 0:
        raise InputError(f"{what} is empty")
    return examples
