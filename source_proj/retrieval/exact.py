"""Exact top-k proponents and opponents by maximum inner product over a feature store.

``score(q, m) = Q[q] . F[m]`` (larger = proponent). Proponents of a query are its k largest
scores; opponents its k most negative ones (the k largest of ``-Q . F[m]``). The search is
exact (flat, brute force) and streams the store shard by shard: each shard of ``shard_rows``
rows is decoded to float32 and multiplied by all queries in blocks (one float32 BLAS product
each, through torch; with bfloat16 screening, below, only of the rows that can still enter
the top k), and every block of scores is fed to faiss's per-query top-k heaps (C++
selection, cheaper than sorting). Proponents and opponents share the products. Memory is
bounded by about two shards (one searched, one prefetched) plus one block of scores,
whatever N is; a shard as large as the store is the classic single in-memory flat index.

Ties. Results are ordered by score, best first, and rows with equal float32 scores by
ascending row id; the k kept are the first k in that order (as a stable argsort of each
query's full score row would give them). Rows are offered in ascending id order, a row
tying with a query's current k-th best never displaces it, and of tied k-th best rows the
larger id is evicted first (``_RunningTopK``). The distributed merge (``merge_topk``) uses
the same order.

bfloat16 screening (``SearchSettings.screen_bf16``)
---------------------------------------------------
Where the CPU has bfloat16 matrix units (AMX: a bf16 product is ~4.5x faster than a float32
one), each block is first multiplied in bfloat16, and only the rows that can still enter the
top k of some query (for some sign) are scored in float32 and offered to the top k; the
others provably cannot enter them. The result is the exact float32 search's: every
reported score is a float32 product ``Q[q] . F[m]``, and no row left out has a float32
score that a top k would have taken. (Last bits of a float32 score depend on the BLAS
kernel's summation order, which depends on the shapes multiplied, as between any two
float32 searches: rows whose scores agree to float32 rounding are ties.)

The screen. For a block of rows and a block of queries, let ``T+[q]`` be the proponents'
current k-th best float32 score of query q and ``T-[q]`` the opponents' (of ``-score``;
-FLT_MAX while fewer than k are held). A score enters only if it beats the k-th best, which
never decreases, so a row whose float32 score R satisfies
``-T-[q] < R < T+[q]`` for every query can be left out. With a margin M (below), the
interval ``(L, H) = (-T- + M, T+ - M)`` (on a side not searched, L or H lies beyond every
score) is written as ``center +- half``; each query is scaled by
``w = 1 / half`` and extended by two offset columns ``t1 + t2 ~ -center * w`` (two bf16
values, so the offset keeps 16 bits), each row by ``[1, 1]``. One bf16 product (fp32
accumulation, bf16 output) then gives ``out ~ (score - center) / half`` for both signs at
once, and a row is kept iff ``|out| >= 1`` for some query: one max and one min per row. A
query whose interval is empty (fewer than k held yet) gets a zero row and offset 2: it keeps
every row.

Derivation (u = 2^-8 the bf16 unit roundoff, u32 = 2^-24, gamma_n = n u32 / (1 - n u32),
eta = 2^-126 the smallest normal float32/bf16, Dp = D + 2 the terms of a product;
a >= ||q||, b >= max ||f|| over the block, from ``_norm_bounds``; s = q . f exactly; w is a
float32, h = 1 / w <= half, z = -(t1 + t2) / w):

1. Rounding: q' = bf16(fl32(w q)) and f' = bf16(f) (round to nearest even; the bf16
   kernels treat subnormal inputs as zero), so each component has relative error at most
   u1 = u + 2 u32 (resp. u) plus an absolute eta. Summing, with Cauchy-Schwarz
   (sum |q_i f_i| <= a b, |x|_1 <= sqrt(D) ||x||):
   |q'.f' - w s| <= (u1 + u + u1 u) w a b + eta-terms, sum |q'_i f'_i| <= (1 + u1)(1 + u) w a b + eta-terms.
2. Accumulation: products of bf16 values are exact in fp32, and the kernel adds the Dp
   terms with fp32 FMAs/additions in some order; any order gives
   |acc - (q'.f' + t1 + t2)| <= gamma_Dp (sum |q'_i f'_i| + |t1| + |t2|) + 4 Dp eta (each of
   at most 2 Dp operations may flush a result below eta to zero).
3. Output: bf16 rounding to nearest (or flushing to zero) is monotone and keeps +-1, so
   ``|out| < 1`` implies ``|acc| < 1``: the output rounding costs nothing.
4. The float32 score reported or compared: |R - s| <= gamma_D a b + 4 D eta.

Combining 1.-4. and dividing by w: a dropped row (|acc| < 1) has |R - z| < h + M* with
M* = c a b + gamma_Dp (1 + 3u) |z| + A, c = u1 + u + u1 u + gamma_Dp (1 + u1)(1 + u) + gamma_D
(about 2^-7), and A, all the eta terms, <= 2^-121 Dp (2 a b + a + 3)(1 + b) when
half <= 2 (a b + 1). The offset split leaves |t1 + t2 + center w| <= 2 u^2 |center w| (2:
torch may round float64 to bf16 through float32). So with Z >= |center| and
M = (c a b + A + (2 gamma_Dp + 4 u^2) Z)(1 + 2^-40) (the last factor, a shrink of half by
2^-40 and w rounded up cover the float64/float32 evaluation),
z + h + M* <= center + half + M = T+ and z - h - M* >= -T-: a dropped row could enter neither
top k. Preconditions, checked per block (else every row is scored in float32): a, b <= 2^50;
per query, (a b + 1) 2^-40 < half <= 2 (a b + 1) (else the query keeps every row), so that
|w q|, |w s|, |t| < 2^91 and nothing overflows. The float32 side assumes
torch's default float32 matmul precision ("highest").

The margin is rank one in (||q||, max ||f||): the per-query scale and offset fold it into
the product. A block costs one bf16 product, a max and a min over each row of its output,
and the float32 rescoring of the kept rows (a few hundred of 16384 once the top k hold good
scores), for proponents, opponents or both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from source_proj.distributed.gather import gather_rows
from source_proj.distributed.group import ProcessGroup
from source_proj.errors import InputError
from source_proj.features.source import FeatureSource, MemoryFeatures

# Queries multiplied at once (as faiss does in its own searches).
_QUERY_BLOCK = 4096
# Automatic screening needs this many queries: with fewer, a product is bound by reading the
# rows, and rounding them to bf16 costs about what it saves.
_MIN_SCREENED_QUERIES = 128
_U16 = 2.0**-8  # bfloat16 unit roundoff (8 significant bits)
_U32 = 2.0**-24  # float32 unit roundoff
_MAX_NORM = 2.0**50  # screening precondition on query and row norms (no overflow)
_MAX_DIM = 2**20  # screening precondition on D (the rounding bounds below assume it)


@dataclass(frozen=True)
class TopK:
    """The k best training rows of each query.

    Attributes:
        scores: (n_query, k) float32 scores ``Q[q] . F[ids[q, j]]``, best first (descending
            for proponents, ascending, i.e. most negative first, for opponents); equal
            scores in ascending row id order, the smaller ids kept.
        ids: (n_query, k) int64 training row indices (0-based rows of the store).
    """

    scores: np.ndarray
    ids: np.ndarray


@dataclass(frozen=True)
class SearchSettings:
    """How an exact search walks the store.

    Attributes:
        shard_rows: rows of F decoded and searched at a time (rounded up to whole store
            chunks); memory is about 2 * shard_rows * D * 4 bytes plus the queries.
        prefetch: read the next shard in a background thread during the search of this one.
        block_rows: rows of a shard multiplied by the queries at once; the scores of one
            product take min(n_query, 4096) x block_rows x 4 bytes (with ``screen_bf16``,
            also block_rows x D x 2 bytes of bf16 rows, as much for the bf16 products, and a
            bf16 copy of the queries).
        screen_bf16: multiply each block in bfloat16 first and score in float32 only the rows
            that can still enter a query's top k (same results, see the module docstring);
            None (default) does so when the CPU has AMX bf16 units (``bf16_is_fast``), there
            are at least 128 queries and D <= 2^20.
    """

    shard_rows: int = 65536
    prefetch: bool = True
    block_rows: int = 16384
    screen_bf16: bool | None = None

    def __post_init__(self) -> None:
        for name in ("shard_rows", "block_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"SearchSettings.{name} must be a positive int, got {value!r}")
        if not (self.screen_bf16 is None or isinstance(self.screen_bf16, bool)):
            raise InputError(
                f"SearchSettings.screen_bf16 must be None, True or False, got {self.screen_bf16!r}"
            )


def check_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    """Validate query features (n_query, dim) and return them as contiguous float32."""
    q = np.asarray(queries)
    if q.ndim != 2 or q.shape[1] != dim or q.shape[0] == 0:
        raise InputError(f"queries must have shape (n_query >= 1, {dim}), got {q.shape}")
    if not np.issubdtype(q.dtype, np.floating) or not np.all(np.isfinite(q)):
        raise InputError("queries must be finite floating-point features")
    return np.ascontiguousarray(q, dtype=np.float32)


def check_k(k: int, n_rows: int) -> int:
    """Validate the number of results asked for against the number of training rows."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_rows:
        raise InputError(f"k must be an int in [1, {n_rows}] (the store's rows), got {k!r}")
    return int(k)


def bf16_is_fast() -> bool:
    """Whether torch multiplies bfloat16 matrices on AMX units here (through oneDNN): then
    a bf16 product is several times faster than a float32 one."""
    is_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return torch.backends.mkldnn.is_available() and is_amx is not None and bool(is_amx())


def _gamma(n: int) -> float:
    """gamma_n = n u32 / (1 - n u32): the error of a float32 sum of n terms, in any order,
    relative to the sum of their magnitudes."""
    return n * _U32 / (1 - n * _U32)


def _norm_bounds(x: torch.Tensor) -> np.ndarray:
    """Upper bounds on the Euclidean norms of the rows of ``x`` (n, D) float32, float64 (n,).

    torch's float32 norm n^ is the square root of a sum of D rounded squares (any order):
    sum x_i^2 <= (n^^2 / (1 - u32)^2 + D 2^-124) / (1 - gamma_D), with D 2^-124 for flushed
    underflows, hence ||x|| <= (n^ + sqrt(D) 2^-62) (1 + (4D + 3) u32) for D <= 2^21; one more
    u32 covers this float64 evaluation.
    """
    dim = x.shape[1]
    if dim > _MAX_DIM:
        raise InputError(f"bf16 screening supports rows of at most 2^20 features, got {dim}")
    computed = torch.linalg.vector_norm(x, dim=1).numpy().astype(np.float64)
    return (computed + np.sqrt(dim) * 2.0**-62) * (1 + (4 * dim + 4) * _U32)


class _Bf16Screen:
    """The bfloat16 screen of one search (see the module docstring): the search's queries
    and a bf16 copy of the current block of rows, with their norm bounds."""

    def __init__(self, queries: torch.Tensor, signs: tuple[float, ...], block_rows: int) -> None:
        """``queries`` (n_query, D) float32; ``signs`` those of the search's top k (+1
        proponents, -1 opponents); ``block_rows`` the most rows a block will have."""
        n_query, dim = queries.shape
        self.dim = dim
        self.signs = signs
        self.source_queries = queries
        self.query_norms = _norm_bounds(queries)
        self.gamma = _gamma(dim + 2)
        u1 = _U16 + 2 * _U32  # a scaled query: rounded to float32, then to bf16
        self.c = u1 + _U16 + u1 * _U16 + self.gamma * (1 + u1) * (1 + _U16) + _gamma(dim)
        self.a0 = 2.0**-121 * (dim + 2)
        # (n_query, D + 2): bf16(w Q) and the offset columns t1, t2, filled per block.
        self.queries = torch.empty(n_query, dim + 2, dtype=torch.bfloat16)
        # (block_rows, D + 2): bf16(F) of the current block and two columns of ones.
        self.rows = torch.empty(block_rows, dim + 2, dtype=torch.bfloat16)
        self.rows[:, dim:] = 1.0
        self.n_rows = 0
        self.row_norm = 0.0

    def load(self, rows: torch.Tensor) -> None:
        """Round a block of rows (n <= block_rows, D) float32 to bf16 and bound their norms."""
        self.n_rows = rows.shape[0]
        self.rows[: self.n_rows, : self.dim].copy_(rows)
        self.row_norm = float(_norm_bounds(rows).max())

    def _intervals(self, kth: Sequence[np.ndarray], a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(center, half)`` float64 (n,) of the score intervals to drop, given each sign's
        k-th best scores ``kth[j]`` (n,) float32 and the query norm bounds ``a`` (n,);
        half = 0 where a query keeps every row."""
        b = self.row_norm
        reach = a * b * (1 + 2 * self.c) + 1  # beyond every |R|: a side not searched keeps no row
        bound = {1.0: reach, -1.0: reach}
        for sign, kth_j in zip(self.signs, kth):
            bound[sign] = kth_j.astype(np.float64)  # T+, or T- for the opponents
        spare = self.c * a * b + self.a0 * (2 * a * b + a + 3) * (1 + b)
        grow = 2 * self.gamma + 4 * _U16**2
        # >= max(|high|, |low|) >= |center| (with grow <= 1/4, as D <= _MAX_DIM ensures)
        size = (np.maximum(np.abs(bound[1.0]), np.abs(bound[-1.0])) + 2 * spare) * (1 + 2 * grow)
        margin = (spare + grow * size) * (1 + 2.0**-40)
        high, low = bound[1.0] - margin, margin - bound[-1.0]
        center, half = (high + low) / 2, (high - low) / 2 * (1 - 2.0**-40)
        usable = (half > (a * b + 1) * 2.0**-40) & (half <= 2 * (a * b + 1))
        return np.where(usable, center, 0.0), np.where(usable, half, 0.0)

    def candidates(self, q0: int, q1: int, kth: Sequence[np.ndarray]) -> torch.Tensor | None:
        """Indices (int64) of the rows of the loaded block that may enter the top k of some
        query in [q0, q1) for some sign, given the current k-th best scores
        ``kth[j]`` (q1 - q0,) float32 of sign j; None: every row (preconditions not met)."""
        a = self.query_norms[q0:q1]
        if not (a.max() <= _MAX_NORM and self.row_norm <= _MAX_NORM):
            return None
        center, half = self._intervals(kth, a)
        usable = half > 0
        inverse = np.divide(1.0, half, out=np.zeros_like(half), where=usable)
        scale = inverse.astype(np.float32)  # w, rounded up: 1 / w <= half
        scale = np.where(scale < inverse, np.nextafter(scale, np.float32(np.inf)), scale)
        offset = torch.from_numpy(np.where(usable, -center * scale, 2.0))  # 2: keep every row
        t1 = offset.to(torch.bfloat16)
        t2 = (offset - t1.double()).to(torch.bfloat16)
        queries = self.queries[q0:q1]
        queries[:, : self.dim].copy_(self.source_queries[q0:q1] * torch.from_numpy(scale)[:, None])
        queries[:, self.dim], queries[:, self.dim + 1] = t1, t2
        products = self.rows[: self.n_rows] @ queries.T  # (rows, queries)
        dropped = (products.amax(dim=1) < 1) & (products.amin(dim=1) > -1)
        return (~dropped).nonzero()[:, 0]


def _uses_screen(settings: SearchSettings, queries: np.ndarray) -> bool:
    """Whether a search of ``queries`` (n_query, D) screens in bf16 (``SearchSettings``)."""
    if settings.screen_bf16 is not None:
        return settings.screen_bf16
    n_query, dim = queries.shape
    return n_query >= _MIN_SCREENED_QUERIES and dim <= _MAX_DIM and bf16_is_fast()


class _RunningTopK:
    """The k largest scores of each query among the rows offered so far, and their row ids,
    held in faiss's per-query heaps (C++ selection, cheaper than sorting).

    Ties. A heap admits a score only if it beats its k-th best, and faiss orders heap entries
    by (score, heap id) (``faiss/utils/Heap.h``, ``cmp2``), so of equal k-th best scores it
    evicts the smallest heap id first. Rows enter as heap id ``-2 - row``: the larger row
    goes. With rows offered in ascending order, the heap holds the first k rows by (score
    descending, row ascending), the order ``result`` returns them in.
    """

    def __init__(self, n_query: int, k: int) -> None:
        self.heap = faiss.ResultHeap(n_query, k, keep_max=True)

    def kth(self, q0: int, q1: int) -> np.ndarray:
        """The k-th best scores (q1 - q0,) of queries [q0, q1); -FLT_MAX while fewer than k."""
        return self.heap.D[q0:q1, 0]

    def offer(self, scores: np.ndarray, rows: np.ndarray, q0: int) -> None:
        """Offer ``scores`` (n_q, n) float32 of the store rows ``rows`` (n,) int64, ascending
        and above every row offered before, for queries q0, q0 + 1, ...."""
        ids = -2 - rows
        # id_stride 0: the same row ids for every query.
        self.heap.heaps.addn_with_ids(
            scores.shape[1], faiss.swig_ptr(scores), faiss.swig_ptr(ids), 0, q0, scores.shape[0]
        )

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, rows)`` (n_query, k): best first, equal scores by ascending row; empty
        slots (fewer than k rows offered) last, with score -FLT_MAX and row -1."""
        self.heap.finalize()
        rows = np.where(self.heap.I < -1, -2 - self.heap.I, -1)
        order = np.lexsort((rows, -self.heap.D.astype(np.float64)))
        return np.take_along_axis(self.heap.D, order, 1), np.take_along_axis(rows, order, 1)


def _offer(
    tops: Sequence[_RunningTopK],
    signs: tuple[float, ...],
    queries: torch.Tensor,
    rows: torch.Tensor,
    picked: torch.Tensor | None,
    row0: int,
    q0: int,
) -> None:
    """Score ``rows`` (n, D) float32, or only the ``picked`` ones (ascending indices into
    them), exactly in float32 against ``queries`` (queries q0, q0 + 1, ... of the search) and
    offer the scores times each sign to that sign's top k; ``row0`` is the store row of
    ``rows[0]``."""
    if picked is not None and len(picked) < rows.shape[0]:
        if len(picked) == 0:
            return
        rows, ids = rows[picked], picked.numpy() + row0
    else:
        ids = np.arange(row0, row0 + rows.shape[0], dtype=np.int64)
    scores = (queries @ rows.T).numpy()
    current = 1.0
    for sign, top in zip(signs, tops):
        if sign != current:
            np.negative(scores, out=scores)
            current = sign
        top.offer(scores, ids, q0)


def _search(
    store: FeatureSource,
    queries: np.ndarray,
    k: int,
    signs: tuple[float, ...],
    settings: SearchSettings,
    segments: Sequence[int] | None,
    progress: bool,
) -> list[TopK]:
    """For each sign s, the k largest ``s * (queries @ F.T)`` per query, as a ``TopK`` of the
    unsigned scores; one pass over the store, one product per block for all signs.

    Under ``torch.distributed`` the shards are dealt round-robin to the ranks, each rank
    searches its own, and the ranks' top k are merged exactly (``merge_topk``) on every rank:
    each score is the same float32 product as in one process (same shard and block shapes).
    """
    group = ProcessGroup.current()
    n_query = queries.shape[0]
    tops = [_RunningTopK(n_query, k) for _ in signs]
    q = torch.from_numpy(queries)
    screen = _Bf16Screen(q, signs, settings.block_rows) if _uses_screen(settings, queries) else None
    blocks = store.iter_blocks(
        settings.shard_rows, segments, prefetch=settings.prefetch, reuse_buffers=True, select=group.strided
    )
    rows_here = store.n_rows if not group.distributed else None
    with tqdm(total=rows_here, unit="row", desc="top-k search", disable=not (progress and group.is_main)) as bar:
        for start, shard in blocks:
            for r0 in range(0, shard.shape[0], settings.block_rows):
                rows = torch.from_numpy(shard[r0 : r0 + settings.block_rows])
                if screen is not None:
                    screen.load(rows)
                for q0 in range(0, n_query, _QUERY_BLOCK):
                    q1 = min(q0 + _QUERY_BLOCK, n_query)
                    picked = None
                    if screen is not None:  # given each sign's current k-th best scores
                        picked = screen.candidates(q0, q1, [top.kth(q0, q1) for top in tops])
                    _offer(tops, signs, q[q0:q1], rows, picked, start + r0, q0)
            bar.update(shard.shape[0])
    return [
        TopK(sign * scores, ids)
        for sign, (scores, ids) in zip(signs, (merge_topk(group, *top.result()) for top in tops))
    ]


def merge_topk(group: ProcessGroup, scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The k best of every rank's top-k ``(scores, ids)`` (n_query, k), best (largest score)
    first, ties by smaller id; on every rank. Empty slots (id -1) never win while any
    rank has a real row. A single process gets its own arrays back."""
    if not group.distributed:
        return scores, ids
    k = scores.shape[1]
    every_score = gather_rows(group, torch.from_numpy(np.ascontiguousarray(scores))[None])
    every_id = gather_rows(group, torch.from_numpy(np.ascontiguousarray(ids))[None])
    all_scores = every_score.permute(1, 0, 2).reshape(scores.shape[0], -1).numpy()
    all_ids = every_id.permute(1, 0, 2).reshape(ids.shape[0], -1).numpy()
    missing = all_ids < 0
    # Sort by (empty slot last, score descending, id ascending).
    order = np.lexsort((all_ids, -all_scores.astype(np.float64), missing), axis=1)[:, :k]
    return np.take_along_axis(all_scores, order, 1), np.take_along_axis(all_ids, order, 1)


def exact_topk(
    store: FeatureSource | np.ndarray | torch.Tensor,
    queries: np.ndarray,
    k: int,
    *,
    opponents: bool = False,
    segments: Sequence[int] | None = None,
    settings: SearchSettings = SearchSettings(),
    progress: bool = True,
) -> TopK:
    """Exact top-k proponents (or, with ``opponents``, opponents) of many queries.

    Args:
        store: the training features: a complete feature store, any ``FeatureSource``, or an
            (N, D) array in memory.
        queries: query features Q, (n_query, D) (or (n_query, k) with ``segments``).
        k: results per query, 1 <= k <= N.
        opponents: return the k most negative scores instead of the k largest.
        segments: restrict the scores to these segments' per-segment features.
        settings: shard and block sizes, prefetching, bf16 screening.
        progress: show a progress bar.
    """
    store = MemoryFeatures.of(store)
    q = check_queries(queries, store.feature_dim(segments))
    k = check_k(k, store.n_rows)
    return _search(store, q, k, (-1.0 if opponents else 1.0,), settings, segments, progress)[0]


def exact_proponents_opponents(
    store: FeatureSource | np.ndarray | torch.Tensor,
    queries: np.ndarray,
    k: int,
    *,
    segments: Sequence[int] | None = None,
    settings: SearchSettings = SearchSettings(),
    progress: bool = True,
) -> tuple[TopK, TopK]:
    """Exact top-k proponents and opponents in one pass over the store (arguments as in
    ``exact_topk``), each block of scores computed once; returns ``(proponents, opponents)``."""
    store = MemoryFeatures.of(store)
    q = check_queries(queries, store.feature_dim(segments))
    k = check_k(k, store.n_rows)
    proponents, opponents = _search(store, q, k, (1.0, -1.0), settings, segments, progress)
    return proponents, opponents
