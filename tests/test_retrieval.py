"""Exact and IVF top-k against brute-force torch.topk over dense scores (float64, or float32
where every float32 score is exact), with and without the bfloat16 screen."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from store_helpers import METADATA, chunk_features, dense_store

from source_proj.features.errors import StoreIncompleteError
from source_proj.features.layout import StoreLayout
from source_proj.features.store import FeatureStore
from source_proj.retrieval import exact as retrieval
from source_proj.retrieval.exact import (
    SearchSettings,
    TopK,
    exact_proponents_opponents,
    exact_topk,
)
from source_proj.retrieval.ivf import (
    ApproxIndex,
    IVFSettings,
    StaleIndexError,
    build_ivf,
    index_dir,
    recall_at_k,
)

# faiss accumulates in float32: a score may differ from the float64 oracle by about
# D * 2^-24 * |q| |f|; REL_TOL |q| |f| is a safe bound for D <= 32 and is what counts as a tie.
REL_TOL = 1e-5


def assert_matches_topk(found: TopK, queries: np.ndarray, features: np.ndarray, k: int, largest: bool) -> None:
    """``found`` equals ``torch.topk`` over the dense float64 scores, ties aside."""
    dense = torch.from_numpy(queries).double() @ torch.from_numpy(features).double().T
    values, ids = (t.numpy() for t in torch.topk(dense, k + 1, dim=1, largest=largest))
    dense = dense.numpy()
    tol = REL_TOL * np.linalg.norm(queries, axis=1)[:, None] * np.linalg.norm(features, axis=1)[None, :]
    assert found.ids.shape == found.scores.shape == (dense.shape[0], k)
    assert all(len(set(row)) == k for row in found.ids)
    # The reported scores are the true scores of the reported rows, and rank by rank equal
    # to the oracle's top-k values.
    found_tol = np.take_along_axis(tol, found.ids, 1)
    oracle_tol = np.take_along_axis(tol, ids, 1)
    assert np.all(np.abs(found.scores - np.take_along_axis(dense, found.ids, 1)) <= found_tol)
    assert np.all(np.abs(found.scores - values[:, :k]) <= np.maximum(found_tol, oracle_tol[:, :k]))
    # A row whose oracle score is more than the tolerance away from its neighbours' (ranks
    # j - 1 and j + 1, the latter possibly the (k+1)-th) must be at exactly the oracle's rank.
    gap_up = np.abs(np.diff(values, axis=1, prepend=np.inf if largest else -np.inf))[:, :k]
    gap_down = np.abs(np.diff(values, axis=1))
    distinct = (gap_up > 2 * np.maximum(oracle_tol[:, :k], np.roll(oracle_tol, 1, axis=1)[:, :k])) & (
        gap_down > 2 * np.maximum(oracle_tol[:, :k], oracle_tol[:, 1:])
    )
    assert distinct.mean() > 0.9  # the comparison below is not vacuous
    np.testing.assert_array_equal(found.ids[distinct], ids[:, :k][distinct])


def _queries(n: int, dim: int, seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


@pytest.fixture(scope="module")
def store_and_features(tmp_path_factory: pytest.TempPathFactory) -> tuple[FeatureStore, np.ndarray]:
    features = chunk_features(0, 1000, 16)
    return dense_store(tmp_path_factory.mktemp("r") / "s.zarr", features, chunk_rows=64), features


@pytest.mark.parametrize("screen", [False, True])
@pytest.mark.parametrize("k", [1, 10, 200])  # 200 > a shard's 128 rows: results span shards
@pytest.mark.parametrize("sharded", [True, False])  # 8 shards of 128 rows / one flat shard
def test_exact_topk_equals_torch_topk(store_and_features, k: int, sharded: bool, screen: bool, monkeypatch) -> None:
    store, features = store_and_features
    queries = _queries(9, 16)
    if sharded:  # and BLAS blocks of 50 rows x 4 queries inside the shards
        settings = SearchSettings(shard_rows=100, block_rows=50, screen_bf16=screen)
        monkeypatch.setattr(retrieval, "_QUERY_BLOCK", 4)
    else:
        settings = SearchSettings(shard_rows=10**6, screen_bf16=screen)
    proponents = exact_topk(store, queries, k, settings=settings, progress=False)
    opponents = exact_topk(store, queries, k, opponents=True, settings=settings, progress=False)
    assert_matches_topk(proponents, queries, features, k, largest=True)
    assert_matches_topk(opponents, queries, features, k, largest=False)
    assert np.all(proponents.scores[:, :1] > 0) and np.all(opponents.scores[:, :1] < 0)
    one_pass = exact_proponents_opponents(store, queries, k, settings=settings, progress=False)
    assert_matches_topk(one_pass[0], queries, features, k, largest=True)
    assert_matches_topk(one_pass[1], queries, features, k, largest=False)


def test_exact_topk_on_segments(tmp_path: Path) -> None:
    features = chunk_features(0, 500, 8)
    segments = chunk_features(0, 500, 3 * 8, seed=1).reshape(500, 3, 8)
    store = dense_store(tmp_path / "s.zarr", features, segment_features=segments)
    queries = _queries(6, 8)
    stage = segments[:, [0, 2]].astype(np.float64).sum(axis=1)
    for screen in (False, True):
        settings = SearchSettings(shard_rows=100, screen_bf16=screen)
        found = exact_topk(store, queries, 15, segments=[0, 2], settings=settings, progress=False)
        assert_matches_topk(found, queries, stage, 15, largest=True)


def test_exact_topk_rejects_bad_input(store_and_features, tmp_path: Path) -> None:
    store, _ = store_and_features
    queries = _queries(3, 16)
    for k in (0, 1001, 2.5):
        with pytest.raises(ValueError, match="k must be"):
            exact_topk(store, queries, k, progress=False)
    with pytest.raises(ValueError, match=r"shape \(n_query >= 1, 16\)"):
        exact_topk(store, queries[:, :8], 3, progress=False)
    with pytest.raises(ValueError, match="finite"):
        exact_topk(store, np.full((2, 16), np.nan), 3, progress=False)
    with pytest.raises(ValueError, match="per-segment"):
        exact_topk(store, queries, 3, segments=[0], progress=False)
    for bad in (1, "auto"):
        with pytest.raises(ValueError, match="screen_bf16"):
            SearchSettings(screen_bf16=bad)
    empty = FeatureStore.create(tmp_path / "e.zarr", StoreLayout(100, 16), METADATA)
    with pytest.raises(StoreIncompleteError):
        exact_topk(empty, queries, 3, progress=False)



def argsort_topk(dense: np.ndarray, k: int, largest: bool) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k of a dense (n_query, N) score matrix by a stable argsort: best
    score first, equal scores by ascending row id (the documented tie order)."""
    ids = np.argsort(-dense if largest else dense, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dense, ids, 1), ids


@pytest.mark.parametrize("screen", [False, True])
@pytest.mark.parametrize("k", [1, 6, 150])  # 150 > a shard's 128 rows
def test_exact_topk_breaks_ties_by_row_id_on_float16_blocks(tmp_path: Path, k: int, screen: bool, monkeypatch) -> None:
    """Integer features in {-2, ..., 2} in a float16 store: every float32 score is an exact
    integer, so most scores tie. The search returns exactly the argsort oracle's ids and
    scores, ties broken by the smaller row id, through shards, blocks and query blocks, for
    proponents, opponents and both in one pass."""
    rng = np.random.default_rng(k)
    features = rng.integers(-2, 3, (700, 12)).astype(np.float32)
    features[350:360] = features[10]  # duplicated rows across shards: equal scores everywhere
    queries = rng.integers(-2, 3, (9, 12)).astype(np.float32)
    store = dense_store(tmp_path / "ties.zarr", features, dtype="float16", chunk_rows=32)
    decoded = store.read_rows(0, 700)
    np.testing.assert_array_equal(decoded, features)  # float16 blocks decode exactly here
    dense = queries.astype(np.float64) @ features.astype(np.float64).T
    assert (np.diff(np.sort(dense, axis=1), axis=1) == 0).mean() > 0.9  # ties are the rule
    settings = SearchSettings(shard_rows=128, block_rows=50, screen_bf16=screen)
    monkeypatch.setattr(retrieval, "_QUERY_BLOCK", 4)
    found = {
        True: exact_topk(store, queries, k, settings=settings, progress=False),
        False: exact_topk(store, queries, k, opponents=True, settings=settings, progress=False),
    }
    both = exact_proponents_opponents(store, queries, k, settings=settings, progress=False)
    for largest, one_pass in ((True, both[0]), (False, both[1])):
        scores, ids = argsort_topk(dense, k, largest)
        for result in (found[largest], one_pass):
            np.testing.assert_array_equal(result.ids, ids)
            np.testing.assert_array_equal(result.scores, scores)


# ------------------------------------------------------------------- bfloat16 screening
def _rounding_adversaries(n_each: int, n_noise: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows (N, 16) and queries (6, 16), float32, whose float32 scores are exact in any
    summation order (multiples of 1/32 below 2^19), built so that bf16 rounding reorders
    near-ties and hides as much of the screen's error bound as rows can.

    Queries 0-2 are s_p * 261/32 for sign patterns s_p. Per pattern p: ``n_each`` decoys
    s_p * (2054 + 16 r) and ``n_each`` adversaries s_p * (2055 + 16 r) (r in 0..15 per
    component), which bf16 both rounds down to s_p * (2048 + 16 r): an adversary's exact
    score is 130.5 above its decoy's, their bf16 scores are equal, and the rounding of an
    adversary takes 7/2055 of every product (0.87 u |q| |f|, all in the same direction),
    which is as much as rows can lose: about half of the screen's margin (the other half
    is for the rounding of the scaled queries, which the screen makes generic; the test of
    aligned features checks it). Each row also comes negated (the opponents mirror the
    proponents). Decoys come first, so the heaps are full of them when the adversaries are
    screened, which must keep those that beat the heaps' k-th decoy; then the adversaries
    and ``n_noise`` random rows, shuffled. Queries 3-5 are random integers."""
    rng = np.random.default_rng(seed)
    patterns = rng.choice([-1.0, 1.0], (3, 16))
    pick = rng.integers(0, 3, 2 * n_each * 3)
    grid = 2048 + 16 * rng.integers(0, 16, (len(pick), 16))
    decoys = patterns[pick[: 3 * n_each]] * (grid[: 3 * n_each] + 6)
    adversaries = patterns[pick[3 * n_each :]] * (grid[3 * n_each :] + 7)
    noise = rng.integers(-2400, 2400, (n_noise, 16))
    late = np.concatenate([adversaries, -adversaries, noise])
    rows = np.concatenate([decoys, -decoys, late[rng.permutation(len(late))]])
    queries = np.concatenate([patterns * 261 / 32, rng.integers(-8, 9, (3, 16))])
    return rows.astype(np.float32), queries.astype(np.float32)


def assert_identical_topk(found: TopK, dense: torch.Tensor, k: int, largest: bool) -> None:
    """``found`` is a top k of the exact float32 ``dense`` scores (n_query, N): rank by rank
    the same scores as ``torch.topk``, each the reported row's score, no row twice. Where a
    score is not tied, this fixes the row: the ids equal the oracle's."""
    values, ids = torch.topk(dense, k, dim=1, largest=largest)
    np.testing.assert_array_equal(found.scores, values.numpy())
    np.testing.assert_array_equal(np.take_along_axis(dense.numpy(), found.ids, 1), found.scores)
    assert all(len(set(row)) == k for row in found.ids)
    unique = (dense[:, None, :] == values[:, :, None]).sum(-1).numpy() == 1
    np.testing.assert_array_equal(found.ids[unique], ids.numpy()[unique])


@pytest.mark.parametrize("k", [1, 7, 300])  # 300 > a shard's 256 rows
def test_screened_topk_is_exact_on_rounding_adversaries(tmp_path: Path, k: int, monkeypatch) -> None:
    features, queries = _rounding_adversaries(400, 600, seed=k)
    n_rows = len(features)
    dense = torch.from_numpy(queries) @ torch.from_numpy(features).T  # exact (see above)
    assert torch.equal(dense, (torch.from_numpy(queries).double() @ torch.from_numpy(features).double().T).float())
    # Adversarial: bf16 rounding reorders the top k (or changes its set) for some query and kind.
    approx = (torch.from_numpy(queries).bfloat16() @ torch.from_numpy(features).bfloat16().T).float()
    assert any(
        not torch.equal(torch.topk(approx, k, largest=largest).indices, torch.topk(dense, k, largest=largest).indices)
        for largest in (True, False)
    )
    store = dense_store(tmp_path / "t.zarr", features, chunk_rows=64)
    # Shards of 256 rows, BLAS blocks of 100 rows (across chunk boundaries), queries by 4.
    settings = SearchSettings(shard_rows=256, block_rows=100, screen_bf16=True)
    monkeypatch.setattr(retrieval, "_QUERY_BLOCK", 4)
    offered = []
    real_offer = retrieval._offer

    def counting_offer(heaps, signs, q, rows, picked, row0, q0):
        offered.append(rows.shape[0] if picked is None else len(picked))
        real_offer(heaps, signs, q, rows, picked, row0, q0)

    monkeypatch.setattr(retrieval, "_offer", counting_offer)
    for opponents in (False, True):
        found = exact_topk(store, queries, k, opponents=opponents, settings=settings, progress=False)
        assert_identical_topk(found, dense, k, largest=not opponents)
    proponents, opponents = exact_proponents_opponents(store, queries, k, settings=settings, progress=False)
    assert_identical_topk(proponents, dense, k, largest=True)
    assert_identical_topk(opponents, dense, k, largest=False)
    # The screen did leave rows out (3 searches, 2 query blocks each).
    assert sum(offered) < (0.3 if k < 10 else 0.8) * 3 * 2 * n_rows


def test_bf16_screen_keeps_every_row_that_reaches_the_threshold() -> None:
    """The screen on one block against a float64 oracle: every row whose exact score reaches
    the given k-th best score is kept, for both signs, including a row that a bf16
    accumulation would lose: 64 (1, 2^-9, ..., 2^-9) with the all-ones query scores
    64 (1 + 1023 2^-9) = 191.9, but 1 + 2^-9 rounds to 1 in bf16, so a bf16 sum reads ~64."""
    rng = np.random.default_rng(3)
    dim = 1024
    rows = rng.standard_normal((500, dim)) * rng.lognormal(0.0, 0.3, (500, 1))
    rows[0] = 64 * np.r_[1.0, np.full(dim - 1, 2.0**-9)]
    queries = rng.standard_normal((8, dim))
    queries[0] = 1.0
    rows, queries = rows.astype(np.float32), queries.astype(np.float32)
    exact = queries.astype(np.float64) @ rows.astype(np.float64).T
    screen = retrieval._Bf16Screen(torch.from_numpy(queries), (1.0, -1.0), 512)
    screen.load(torch.from_numpy(rows))
    kth = []
    for sign in (1.0, -1.0):
        third = np.sort(sign * exact, axis=1)[:, -3]
        kth.append(np.nextafter(third.astype(np.float32), -np.inf))  # float32 <= the 3rd best
    kth[0][0] = np.nextafter(np.float32(exact[0, 0]), -np.inf)  # row 0 just reaches query 0's
    assert exact[0, 0] == exact[0].max()
    kept = set(screen.candidates(0, 8, kth).tolist())
    must = {m for sign, t in zip((1.0, -1.0), kth) for m in np.nonzero((sign * exact >= t[:, None]).any(0))[0]}
    assert 0 in must and must <= kept
    assert len(kept) < 250  # and it is a screen: most rows are left out


def test_bf16_rounding_of_aligned_features_nearly_reaches_the_screen_margin() -> None:
    """The margin's main term against a float64 oracle on the worst case for rounding: every
    component of q and f rounded down by almost half a bf16 step, all products positive
    (q = s * 261/32 -> 260/32, f = s * 2055 -> 2048): the bf16 products lose 0.92 of
    (2u + u^2) |q| |f|, and stay within the screen's c |q| |f| (with the output's rounding,
    u |score|, which the screen's sign test does not need: see the module docstring)."""
    signs = np.random.default_rng(0).choice([-1.0, 1.0], (4, 64))
    queries = (signs * 261 / 32).astype(np.float32)
    rows = (signs * 2055).astype(np.float32)
    exact = queries.astype(np.float64) @ rows.astype(np.float64).T
    q_bf, f_bf = torch.from_numpy(queries).bfloat16(), torch.from_numpy(rows).bfloat16()
    rounded = q_bf.double() @ f_bf.double().T  # exact products of the rounded features
    scale = np.linalg.norm(queries, axis=1)[:, None] * np.linalg.norm(rows, axis=1)[None, :]
    screen = retrieval._Bf16Screen(torch.from_numpy(queries), (1.0,), 4)
    lost = np.abs(exact - rounded.numpy()) / scale
    assert lost.max() <= screen.c and np.diag(lost).min() > 0.9 * (2 * 2.0**-8 + 2.0**-16)
    computed = (q_bf @ f_bf.T).double().numpy()  # bf16 kernel: fp32 accumulation, bf16 output
    assert np.all(np.abs(computed - exact) <= screen.c * scale + 2.0**-8 * np.abs(computed) * (1 + 2.0**-7))


def test_norm_bounds_cover_float64_norms() -> None:
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((300, 64)) * np.exp2(rng.integers(-140, 40, (300, 1)))
    rows[0] = 0.0
    rows = rows.astype(np.float32)
    bounds = retrieval._norm_bounds(torch.from_numpy(rows))
    assert np.all(bounds >= np.linalg.norm(rows.astype(np.float64), axis=1))
    assert np.all(bounds <= np.linalg.norm(rows.astype(np.float64), axis=1) * (1 + 2.0**-10) + 2.0**-50)


def test_screen_scores_everything_in_float32_beyond_its_norm_limit(tmp_path: Path, monkeypatch) -> None:
    features = chunk_features(0, 300, 16) * np.float32(2.0**52)  # row norms above 2^50
    store = dense_store(tmp_path / "big.zarr", features)
    queries = _queries(5, 16)
    picked = []
    real_offer = retrieval._offer
    monkeypatch.setattr(retrieval, "_offer", lambda *a: picked.append(a[4]) or real_offer(*a))
    settings = SearchSettings(shard_rows=100, screen_bf16=True)
    assert_matches_topk(exact_topk(store, queries, 20, settings=settings, progress=False), queries, features, 20, True)
    assert picked and all(p is None for p in picked)


@pytest.mark.parametrize("fast", [True, False])
def test_screen_is_automatic_with_many_queries_on_bf16_hardware(store_and_features, fast: bool, monkeypatch) -> None:
    store, features = store_and_features
    monkeypatch.setattr(retrieval, "bf16_is_fast", lambda: fast)
    screens = []
    real_screen = retrieval._Bf16Screen
    monkeypatch.setattr(retrieval, "_Bf16Screen", lambda *a: screens.append(real_screen(*a)) or screens[-1])
    for n_query in (retrieval._MIN_SCREENED_QUERIES - 1, retrieval._MIN_SCREENED_QUERIES):
        queries = _queries(n_query, 16)
        assert_matches_topk(exact_topk(store, queries, 5, progress=False), queries, features, 5, largest=True)
    assert len(screens) == (1 if fast else 0)
    exact_topk(store, queries, 5, settings=SearchSettings(screen_bf16=not fast), progress=False)
    assert len(screens) == 1


# ------------------------------------------------------------------------------- IVF
def _clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Rows scattered around 16 directions with varied norms (IVF needs some structure)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((16, dim))
    rows = centers[rng.integers(0, 16, n)] + 0.5 * rng.standard_normal((n, dim))
    return (rows * rng.lognormal(0.0, 0.3, (n, 1))).astype(np.float32)


@pytest.fixture(scope="module")
def clustered_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[FeatureStore, np.ndarray]:
    features = _clustered(3000, 16, seed=0)
    return dense_store(tmp_path_factory.mktemp("ivf") / "c.zarr", features, chunk_rows=256), features


def test_recall_at_k_counts_set_overlap() -> None:
    rng = np.random.default_rng(0)
    exact = np.stack([rng.permutation(50)[:10] for _ in range(20)])
    found = np.stack([rng.permutation(50)[:10] for _ in range(20)])
    by_sets = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)])
    assert recall_at_k(found, exact) == pytest.approx(by_sets)
    assert recall_at_k(exact, exact) == 1.0


def test_ivf_searching_every_cell_is_exact(clustered_store) -> None:
    store, features = clustered_store
    index = build_ivf(store, IVFSettings(n_lists=12, codec="flat", train_rows=3000, n_probe=12), progress=False)
    queries = _clustered(20, 16, seed=1)
    assert_matches_topk(index.search(queries, 10), queries, features, 10, largest=True)
    assert_matches_topk(index.search(queries, 10, opponents=True), queries, features, 10, largest=False)
    with pytest.raises(ValueError, match="n_probe"):
        index.search(queries, 10, n_probe=13)


def test_ivf_tune_save_load_and_staleness(clustered_store, tmp_path: Path) -> None:
    store, features = clustered_store
    settings = IVFSettings(n_lists=32, codec="fp16", train_rows=3000, n_probe=1)
    index = build_ivf(store, settings, progress=False)
    queries = _clustered(60, 16, seed=2)
    exact = exact_proponents_opponents(store, queries, 10, progress=False)
    recall = index.tune(queries, *exact, target=0.9, max_fraction=1.0)
    assert recall["k"] == 10 and recall["n_queries"] == 60 and recall["target"] == 0.9
    # Independent recount of each kind's recall at its chosen n_probe, and minimality.
    for truth, opp, kind in ((exact[0], False, "proponents"), (exact[1], True, "opponents")):
        n_probe = index.n_probe[kind]
        assert recall[kind]["n_probe"] == n_probe < 32  # cheaper than searching everything
        overlap = np.mean([len(set(f) & set(t)) for f, t in zip(index.search(queries, 10, opponents=opp).ids, truth.ids)])
        assert recall[kind]["recall"] == pytest.approx(overlap / 10) and overlap / 10 >= 0.9
        assert recall[kind]["reached"] and index.worth_using(opp)
        if n_probe > 1:
            fewer = index.search(queries, 10, opponents=opp, n_probe=n_probe // 2).ids
            assert recall_at_k(fewer, truth.ids) < 0.9

    # Probing at most one cell of 32 cannot give perfect recall here: the index says so.
    capped = ApproxIndex(index.index, store, settings, index.store_token, {}, {}).tune(
        queries, *exact, target=1.0, max_fraction=1 / 32
    )
    for kind in ("proponents", "opponents"):
        assert capped[kind]["n_probe"] == 1 and capped[kind]["reached"] is (capped[kind]["recall"] >= 1.0)
    assert not capped["proponents"]["reached"]

    where = index.save(store)
    assert where == index_dir(store) == store.path.with_name("c.zarr.ivf")
    for mmap in (False, True):
        loaded = ApproxIndex.load(FeatureStore.open(store.path), settings, mmap=mmap)
        assert loaded.n_probe == index.n_probe and loaded.recall == index.recall
        for opp in (False, True):
            a, b = loaded.search(queries, 10, opponents=opp), index.search(queries, 10, opponents=opp)
            np.testing.assert_array_equal(a.ids, b.ids)
            np.testing.assert_array_equal(a.scores, b.scores)
    with pytest.raises(StaleIndexError, match="built with"):
        ApproxIndex.load(store, IVFSettings(n_lists=16))

    # The same path now holds a different store: the saved index must not be used.
    moved = tmp_path / "c.zarr"
    remade = dense_store(moved, features + 1.0, chunk_rows=256)
    shutil.copytree(where, index_dir(remade))
    with pytest.raises(StaleIndexError, match="other content"):
        ApproxIndex.load(remade)
    with pytest.raises(FileNotFoundError):
        ApproxIndex.load(dense_store(tmp_path / "fresh.zarr", features[:100]))
