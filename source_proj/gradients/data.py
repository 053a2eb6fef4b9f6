"""Indexable examples from tensors, a ``Dataset`` or a ``DataLoader``.

Attribution addresses training rows by index (chunks, stores, top-k ids), so every input is
normalised to :class:`Examples`: ``len`` and ``rows(start, stop) -> (inputs, targets)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from source_proj.gradients.model import Inputs


@dataclass(frozen=True)
class Examples:
    """A row-addressable data set. ``inputs`` is a tensor or a tuple of tensors (first dim N),
    or ``dataset`` yields ``(inputs, target)`` items collated on demand."""

    inputs: Inputs | None = None
    targets: torch.Tensor | None = None
    dataset: Dataset | None = None

    def __len__(self) -> int:
        if self.dataset is not None:
            return len(self.dataset)  # type: ignore[arg-type]
        return int(self.targets.shape[0])

    def rows(self, start: int, stop: int, device: torch.device | str = "cpu") -> tuple[Inputs, torch.Tensor]:
        """Rows [start, stop) as (inputs, targets) on ``device``."""
        return self.take(range(start, stop), device)

    def take(self, indices: Sequence[int], device: torch.device | str = "cpu") -> tuple[Inputs, torch.Tensor]:
        """Rows at ``indices`` as (inputs, targets) on ``device``."""
        if self.dataset is not None:
            inputs, targets = default_collate([self.dataset[int(i)] for i in indices])
        else:
            idx = torch.as_tensor(list(indices), dtype=torch.long)
            inputs = tuple(x[idx] for x in self.inputs) if isinstance(self.inputs, tuple) else self.inputs[idx]
            targets = self.targets[idx]
        if isinstance(inputs, list):
            inputs = tuple(inputs)
        inputs = tuple(x.to(device) for x in inputs) if isinstance(inputs, tuple) else inputs.to(device)
        return inputs, torch.as_tensor(targets).to(device)


def as_examples(data: Any, what: str = "training data") -> Examples:
    """Normalise ``(inputs, targets)`` tensors, a map-style ``Dataset`` of ``(input, target)``
    items, a ``DataLoader`` (its dataset is used, in index order) or ``Examples``.

    Raises ValueError for an empty data set or mismatched lengths.
    """
    if isinstance(data, Examples):
        examples = data
    elif isinstance(data, DataLoader):
        examples = Examples(dataset=data.dataset)
    elif isinstance(data, Dataset) and not isinstance(data, tuple):
        examples = Examples(dataset=data)
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        inputs, targets = data
        inputs = tuple(inputs) if isinstance(inputs, list) else inputs
        targets = torch.as_tensor(targets)
        lengths = {int(x.shape[0]) for x in (inputs if isinstance(inputs, tuple) else (inputs,))}
        if lengths != {int(targets.shape[0])}:
            raise ValueError(f"{what}: inputs and targets have different lengths ({sorted(lengths)} vs {targets.shape[0]})")
        examples = Examples(inputs=inputs, targets=targets)
    else:
        raise TypeError(f"{what}: expected (inputs, targets) tensors, a Dataset or a DataLoader, got {type(data).__name__}")
    if len(examples) == 0:
        raise ValueError(f"{what} is empty")
    return examples
