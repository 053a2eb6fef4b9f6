"""Per-row curation signals from an attributor and its feature store.

- :func:`final_losses`: each training row's loss at the final checkpoint (one forward pass).
- :func:`query_set_harm`: harm to a query set, the group influence of every row on the set's
  summed *loss* (so that > 0 means harmful whatever the task's measurement), computed in
  one pass over the store with the query features summed block by block.
- :func:`row_effects`: for one training row, the queries whose loss it lowers (helps) and
  raises (hurts) most; a query is listed by the sign of the change, never under both.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from source_proj.attributor import SourceAttributor
from source_proj.errors import InputError
from source_proj.features.store import FeatureStore
from source_proj.gradients.data import as_examples
from source_proj.retrieval.group import group_influence

# Rows per forward pass or per block of query features (bounded memory, few calls).
_BLOCK = 1024


def final_losses(attributor: SourceAttributor, data: Any, *, progress: bool = True) -> np.ndarray:
    """(N,) float64: the task's training loss of every row of ``data`` at the trajectory's
    final checkpoint (the model the scores explain)."""
    examples = as_examples(data)
    model_fn = attributor.model_fn
    final = model_fn.canonical_state(attributor.trajectory.checkpoints[-1].load(), "final checkpoint")
    params, consts = model_fn.split_state(final, attributor.device)
    out = np.empty(len(examples), dtype=np.float64)
    for start in tqdm(range(0, len(examples), _BLOCK), desc="final losses", disable=not progress, leave=False):
        stop = min(len(examples), start + _BLOCK)
        inputs, targets = examples.rows(start, stop, attributor.device)
        with torch.no_grad():
            out[start:stop] = attributor.task.loss(model_fn.forward(params, consts, inputs), targets).double().cpu().numpy()
    if not np.all(np.isfinite(out)):
        bad = np.flatnonzero(~np.isfinite(out))
        raise InputError(f"the final model's loss is not finite for training rows {bad[:10].tolist()}")
    return out


def loss_query_blocks(attributor: SourceAttributor, queries: Any) -> Iterator[torch.Tensor]:
    """Query features of the rows of ``queries`` with the task's loss as the measurement,
    (n_block, D) per block of at most 1024 rows (score > 0: the row raises the query's loss)."""
    examples = as_examples(queries, "queries")
    for start in range(0, len(examples), _BLOCK):
        rows = examples.rows(start, min(len(examples), start + _BLOCK))
        yield attributor.query_features(rows, measurement=attributor.task.loss)


def query_set_harm(
    attributor: SourceAttributor, store: FeatureStore, queries: Any, *, progress: bool = True
) -> np.ndarray:
    """(N,) float64: predicted rise of the summed loss of ``queries`` (tensors, Dataset or
    DataLoader) when each training row of ``store`` is included; > 0 = harmful to the set.
    Memory: one block of query features and two blocks of store rows."""
    return group_influence(store, loss_query_blocks(attributor, queries), progress=progress)


@dataclass(frozen=True)
class RowEffects:
    """The queries one training row helps and hurts most.

    Attributes:
        row: the training row.
        helped, helped_scores: (<= k,) ids of the queries whose loss the row lowers most (the
            predicted change of the loss when the row is included is < 0), and those
            changes, most negative first.
        hurt, hurt_scores: (<= k,) ids of the queries whose loss it raises most (change > 0),
            and the changes, largest first. A query with no change is in neither list.
    """

    row: int
    helped: np.ndarray
    helped_scores: np.ndarray
    hurt: np.ndarray
    hurt_scores: np.ndarray


def row_effects(attributor: SourceAttributor, store: FeatureStore, queries: Any, row: int, k: int = 10) -> RowEffects:
    """At most ``k`` queries whose loss training row ``row`` lowers most (helped: change < 0)
    and at most ``k`` whose loss it raises most (hurt: change > 0); with fewer than 2k
    queries either list may be shorter, and no query is in both."""
    n = store.layout.n_rows
    if isinstance(row, bool) or not isinstance(row, (int, np.integer)) or not 0 <= row < n:
        raise InputError(f"row must be a training row in [0, {n}), got {row!r}")
    features = torch.from_numpy(store.read_rows(int(row), int(row) + 1)[0])
    scores = torch.cat([block @ features for block in loss_query_blocks(attributor, queries)]).double().numpy()
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")
    order = np.argsort(scores, kind="stable")
    helped = order[scores[order] < 0][:k]
    hurt = order[::-1][scores[order[::-1]] > 0][:k]
    return RowEffects(int(row), helped, scores[helped], hurt, scores[hurt])


def training_labels(data: Any) -> np.ndarray | None:
    """(N,) labels of ``data`` when every target is a single value (classification), read
    block by block; None for other targets (e.g. regression vectors)."""
    examples = as_examples(data)
    parts = []
    for start in range(0, len(examples), _BLOCK):
        _, targets = examples.rows(start, min(len(examples), start + _BLOCK))
        if targets.ndim != 1:
            return None
        parts.append(targets.numpy())
    return np.concatenate(parts)
