"""Optional approximate top-k: a faiss IVF (inverted file) index over a feature store.

The index clusters F into ``n_lists`` cells (k-means on a sample of rows) and searches only
the ``n_probe`` cells whose centroids have the largest inner product with the query. It is
approximate: its recall@k against the exact search (``source_proj.retrieval.exact``) is measured on
given queries, and ``tune`` picks the smallest ``n_probe`` reaching a target recall. The
index holds all N rows in memory (4, 2 or 1 bytes per value for codecs flat, fp16, sq8).

It is saved beside the store, in the directory ``<store>.ivf``, with the store's content
token; loading it for a store whose content or settings changed raises ``StaleIndexError``.
The measured recall holds for the k and target it was tuned for (``tuned_for``): retune for
others. A query whose probed cells hold fewer than k rows is searched exactly instead, so
results never contain missing ids.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm.auto import tqdm

from source_proj.errors import InputError, SourceProjError
from source_proj.features.store import FeatureStore
from source_proj.retrieval.exact import TopK, check_k, check_queries, exact_topk

_FACTORY_CODECS = {"flat": "Flat", "fp16": "SQfp16", "sq8": "SQ8"}
_INDEX_FILE = "index.faiss"
_INFO_FILE = "index.json"


class StaleIndexError(SourceProjError, RuntimeError):
    """A saved index does not belong to the store as it is now (or was built differently)."""


@dataclass(frozen=True)
class IVFSettings:
    """How to build the IVF index.

    Attributes:
        n_lists: number of cells; 0 picks about sqrt(N) (at least 39 training rows a cell).
        codec: storage of the rows in the cells: "flat" (float32), "fp16" or "sq8" (8-bit).
        train_rows: rows sampled (whole store chunks, seeded) to train the k-means.
        kmeans_iters: k-means iterations.
        n_probe: cells searched per query until ``tune`` (or ``ApproxIndex.n_probe``) changes it.
        seed: seed of the training sample and of the k-means initialisation.
    """

    n_lists: int = 0
    codec: str = "fp16"
    train_rows: int = 65536
    kmeans_iters: int = 10
    n_probe: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.codec not in _FACTORY_CODECS:
            raise InputError(f"IVF codec must be one of {sorted(_FACTORY_CODECS)}, got {self.codec!r}")
        for name in ("train_rows", "kmeans_iters", "n_probe"):
            if getattr(self, name) < 1:
                raise InputError(f"IVFSettings.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.n_lists < 0:
            raise InputError(f"IVFSettings.n_lists must be >= 0 (0 = automatic), got {self.n_lists!r}")

    def lists_for(self, n_rows: int) -> int:
        """The number of cells used for a store of ``n_rows`` rows."""
        n_train = min(self.train_rows, n_rows)
        if self.n_lists:
            if self.n_lists > n_train:
                raise InputError(f"n_lists = {self.n_lists} needs at least as many training rows, got {n_train}")
            return self.n_lists
        return max(1, min(round(math.sqrt(n_rows)), n_train // 39))


def recall_at_k(found_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean over queries of |found ∩ exact| / k, for id arrays of shape (n_query, k)."""
    if found_ids.shape != exact_ids.shape:
        raise InputError(f"id arrays differ in shape: {found_ids.shape} vs {exact_ids.shape}")
    hits = [len(np.intersect1d(f, e)) for f, e in zip(found_ids, exact_ids)]
    return float(np.mean(hits) / exact_ids.shape[1])


def _kind(opponents: bool) -> str:
    return "opponents" if opponents else "proponents"


def index_dir(store: FeatureStore) -> Path:
    """Where the store's IVF index is saved: the sibling directory ``<store>.ivf``."""
    return store.path.with_name(store.path.name + ".ivf")


def _training_sample(store: FeatureStore, settings: IVFSettings) -> np.ndarray:
    layout = store.layout
    order = np.random.default_rng(settings.seed).permutation(layout.n_chunks)
    blocks, rows = [], 0
    for index in order:
        if rows >= settings.train_rows:
            break
        block = store.read_rows(*layout.chunk_range(int(index)))
        blocks.append(block[: settings.train_rows - rows])
        rows += blocks[-1].shape[0]
    return np.ascontiguousarray(np.concatenate(blocks))


class ApproxIndex:
    """A faiss IVF index over one feature store.

    Proponent and opponent searches probe the cells nearest to ``Q`` and to ``-Q``; as the
    two can need different numbers of cells for the same recall, each kind has its own.

    Attributes:
        index: the faiss ``IndexIVF`` (inner-product metric, ids = store rows).
        store: the feature store it indexes (searched exactly where the index falls short).
        settings: the ``IVFSettings`` it was built with.
        store_token: ``content_token()`` of the store it indexes.
        n_probe: cells searched per query, ``{"proponents": int, "opponents": int}``.
        recall: the last ``tune`` measurement, e.g. ``{"k": 10, "n_queries": 200,
            "target": 0.95, "proponents": {"n_probe": 8, "recall": 0.97, "reached": True},
            "opponents": ...}``;
            empty until measured.
        exact_fallbacks: how many queries of the last ``search`` had fewer than k rows in
            their probed cells and were searched exactly.
    """

    def __init__(
        self, index: faiss.Index, store: FeatureStore, settings: IVFSettings, store_token: str,
        n_probe: dict[str, int], recall: dict[str, Any],
    ) -> None:
        self.index = index
        self.store = store
        self.exact_fallbacks = 0
        self.settings = settings
        self.store_token = store_token
        self.n_probe = dict(n_probe)
        self.recall = recall

    @property
    def n_lists(self) -> int:
        return int(faiss.extract_index_ivf(self.index).nlist)

    def search(
        self, queries: np.ndarray, k: int, *, opponents: bool = False, n_probe: int | None = None,
        fallback: bool = True,
    ) -> TopK:
        """Approximate top-k proponents (or opponents) of queries (n_query, D); see ``TopK``.
        ``n_probe`` overrides the kind's cells per query for this call. A query whose probed
        cells hold fewer than k rows is searched exactly over the store (with ``fallback``;
        without, its missing results have id -1 and score -+FLT_MAX, as faiss returns them)."""
        q = check_queries(queries, self.index.d)
        k = check_k(k, self.index.ntotal)
        probes = self.n_probe[_kind(opponents)] if n_probe is None else n_probe
        if not 1 <= probes <= self.n_lists:
            raise InputError(f"n_probe must be in [1, {self.n_lists}], got {probes}")
        sign = -1.0 if opponents else 1.0
        scores, ids = self.index.search(sign * q, k, params=faiss.SearchParametersIVF(nprobe=probes))  # type: ignore[arg-type, call-arg]  # faiss's stubs: sign * q stays float32, SearchParametersIVF takes nprobe
        scores *= sign
        short = np.nonzero((ids < 0).any(axis=1))[0]
        self.exact_fallbacks = len(short) if fallback else 0
        if fallback and len(short):
            exact = exact_topk(self.store, q[short], k, opponents=opponents, progress=False)
            scores[short], ids[short] = exact.scores, exact.ids
        return TopK(scores, ids)

    def tuned_for(self, k: int, target: float) -> bool:
        """Whether the last ``tune`` measured recall@``k`` against a target of at least
        ``target`` (then its n_probe, or its "not reached" verdict, holds for ``target``)."""
        return self.recall.get("k") == k and self.recall.get("target", -1.0) >= target

    def tune(
        self, queries: np.ndarray, proponents: TopK, opponents: TopK, target: float, *, max_fraction: float = 0.25
    ) -> dict[str, Any]:
        """For proponents and opponents each, set ``n_probe`` to the smallest power of two
        whose recall@k on ``queries``, against the given exact top-k, is at least ``target``.

        Probing more than ``max_fraction`` of the cells costs more than the exact search (the
        IVF scan is not a BLAS product), so the search stops there: the kind is then recorded
        with ``"reached": False`` and its best n_probe, and callers should search it exactly
        (``worth_using``). Returns and records the measurement (see ``recall``)."""
        if not 0.0 < target <= 1.0:
            raise InputError(f"target recall must be in (0, 1], got {target}")
        if not 0.0 < max_fraction <= 1.0:
            raise InputError(f"max_fraction must be in (0, 1], got {max_fraction}")
        limit = max(1, int(max_fraction * self.n_lists))
        candidates = sorted({min(2**i, limit) for i in range(limit.bit_length() + 1)})
        k = proponents.ids.shape[1]
        self.recall = {"k": k, "n_queries": int(np.asarray(queries).shape[0]), "target": target}
        for exact, opp in ((proponents, False), (opponents, True)):
            for n_probe in candidates:  # missing ids (cells with fewer than k rows) count as misses
                found = self.search(queries, k, opponents=opp, n_probe=n_probe, fallback=False)
                recall = recall_at_k(found.ids, exact.ids)
                if recall >= target:
                    break
            self.n_probe[_kind(opp)] = n_probe
            self.recall[_kind(opp)] = {"n_probe": n_probe, "recall": recall, "reached": recall >= target}
        return self.recall

    def worth_using(self, opponents: bool = False) -> bool:
        """Whether the last ``tune`` reached its target recall for this kind of search."""
        return bool(self.recall.get(_kind(opponents), {}).get("reached", False))

    def save(self, store: FeatureStore) -> Path:
        """Write the index and its description to ``index_dir(store)`` (atomically)."""
        if store.content_token() != self.store_token:
            raise StaleIndexError(f"this index was not built from the current content of {store.path}")
        target = index_dir(store)
        tmp = target.with_name(f".{target.name}.saving-{uuid.uuid4().hex}")
        tmp.mkdir()
        try:
            faiss.write_index(self.index, str(tmp / _INDEX_FILE))
            info = {
                "store_token": self.store_token,
                "settings": asdict(self.settings),
                "n_probe": self.n_probe,
                "recall": self.recall,
            }
            (tmp / _INFO_FILE).write_text(json.dumps(info, indent=1))
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
            if target.exists():
                os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    @classmethod
    def load(cls, store: FeatureStore, settings: IVFSettings | None = None, *, mmap: bool = False) -> ApproxIndex:
        """Load the index saved beside ``store``.

        Raises ``FileNotFoundError`` if there is none and ``StaleIndexError`` if the store's
        content changed since it was built, or if ``settings`` are given and differ from the
        ones it was built with. ``mmap`` maps the inverted lists from disk instead of reading
        them into memory.
        """
        where = index_dir(store)
        if not (where / _INFO_FILE).is_file():
            raise FileNotFoundError(f"no IVF index saved at {where}")
        info = json.loads((where / _INFO_FILE).read_text())
        if info["store_token"] != store.content_token():
            raise StaleIndexError(f"the IVF index at {where} was built from other content than {store.path} now holds")
        built = IVFSettings(**info["settings"])
        if settings is not None and built != settings:
            raise StaleIndexError(f"the IVF index at {where} was built with {built}, not {settings}")
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        index = faiss.read_index(str(where / _INDEX_FILE), flags)
        return cls(index, store, built, info["store_token"], info["n_probe"], info["recall"])


def build_ivf(store: FeatureStore, settings: IVFSettings = IVFSettings(), *, progress: bool = True) -> ApproxIndex:
    """Train an IVF index on a sample of ``store`` and add every row, streamed by chunk.
    Memory: the index itself plus one training sample (train_rows x D float32)."""
    layout = store.layout
    store.require_complete()
    n_lists = settings.lists_for(layout.n_rows)
    index = faiss.index_factory(
        layout.dim, f"IVF{n_lists},{_FACTORY_CODECS[settings.codec]}", faiss.METRIC_INNER_PRODUCT
    )
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.niter = settings.kmeans_iters
    ivf.cp.seed = settings.seed
    index.train(_training_sample(store, settings))
    token = store.content_token()
    with tqdm(total=layout.n_rows, unit="row", desc="IVF index", disable=not progress) as bar:
        for _, block in store.iter_blocks(layout.chunk_rows, reuse_buffers=True):  # add() copies
            index.add(block)
            bar.update(block.shape[0])
    n_probe = min(settings.n_probe, n_lists)
    return ApproxIndex(index, store, settings, token, {"proponents": n_probe, "opponents": n_probe}, {})
