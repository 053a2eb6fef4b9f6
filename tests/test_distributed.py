"""Distributed runs (gloo, CPU): results bit-identical to one process, failures on every rank."""

from __future__ import annotations

import pytest
import torch
from dist_helpers import run_ranks
from tiny_models import trained_classifier

from source_proj.attributor import SourceAttributor
from source_proj.distributed.failures import DistributedRunError, together
from source_proj.distributed.group import ProcessGroup
from source_proj.distributed.reduce import TreeSum, tree_total
from source_proj.gradients.data import as_examples


def test_tree_sum_of_contiguous_runs_equals_one_tree():
    # Leaves spanning 40 binades, so that grouping changes the rounded sum.
    gen = torch.Generator().manual_seed(0)
    leaves = [torch.randn(3, dtype=torch.float64, generator=gen) * 2.0 ** (40 * torch.rand(1, generator=gen).item())
              for _ in range(37)]
    whole = TreeSum()
    for i, leaf in enumerate(leaves):
        whole.add(i, leaf)
    sequential = sum(leaves[1:], leaves[0])
    assert not torch.equal(whole.total(), sequential)  # the grouping matters for these leaves
    torch.testing.assert_close(whole.total(), sequential, rtol=1e-12, atol=0)
    for cuts in ([0, 37], [0, 5, 37], [0, 3, 9, 22, 37], [0, 1, 2, 3, 4, 36, 37], [0, 16, 17, 32, 37]):
        combined = TreeSum()
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            part = TreeSum()
            for i in range(lo, hi):
                part.add(i, leaves[i])
            for node in part.nodes():
                combined.add_node(*node)
        assert torch.equal(combined.total(), whole.total()), cuts


def test_tree_sum_refuses_nodes_out_of_order():
    tree = TreeSum()
    tree.add(0, torch.ones(1))
    with pytest.raises(ValueError, match="in order"):
        tree.add(2, torch.ones(1))


def test_process_group_spans_cover_range_once():
    for world in (1, 2, 3, 5):
        spans = [ProcessGroup(r, world).span(11) for r in range(world)]
        assert [i for s in spans for i in s] == list(range(11))
        assert max(map(len, spans)) - min(map(len, spans)) <= 1


def _everything() -> dict[str, torch.Tensor]:
    """Curvature (exact and sampled), in-memory features, self-influence and query features."""
    model, trajectory, (x, y) = trained_classifier(n=44)
    out = {}
    # The grouped projection's shares are measured on rank 0 and taken by every rank.
    settings = {"exact": {}, "sampled": {"curvature": "sampled"},
                "grouped": {"proj_structure": "grouped", "curvature_blocks": "layer"}}
    for mode, extra in settings.items():
        attributor = SourceAttributor(
            model, "classification", trajectory, proj_dim=16, chunk_size=6, keep_segment_features=True,
            query_mode="final", progress=False, **extra,
        )
        attributor.fit((x, y))
        out[f"{mode}/hessian"] = attributor.checkpoint_hessian(1, as_examples((x, y)))
        out[f"{mode}/eigenvectors"] = torch.stack([s.eigenvectors for s in attributor.spectra])
        out[f"{mode}/features"] = attributor.train_features
        out[f"{mode}/segment_features"] = attributor.train_segment_features
        out[f"{mode}/self_influence"] = attributor.self_influence()
        out[f"{mode}/queries"] = attributor.query_features((x[:13], y[:13]))
    return out


def test_in_memory_fit_bit_identical_for_any_world_size(tmp_path):
    torch.set_num_threads(1)  # the ranks run one thread each: the same BLAS code paths
    try:
        single = _everything()
    finally:
        torch.set_num_threads(2)
    assert not torch.equal(single["exact/features"], single["sampled/features"])
    assert not torch.equal(single["exact/features"], single["grouped/features"])
    for world in (2, 3):
        for rank, result in enumerate(run_ranks(world, _everything, (), tmp_path)):
            assert "ok" in result, result.get("traceback")
            for name, ref in single.items():
                assert torch.equal(result["ok"][name], ref), (world, rank, name)


def _fail_on_rank_one() -> None:
    group = ProcessGroup.current()
    with together(group, "featurisation"):
        if group.rank == 1:
            raise FloatingPointError("NaN in rank 1's shard")
    # Reached only if no rank failed; a collective here would hang if together() did not raise.
    tree_total(group, TreeSum(), torch.zeros(1))


def test_a_failing_rank_stops_every_rank_with_its_message(tmp_path):
    results = run_ranks(3, _fail_on_rank_one, (), tmp_path, timeout=60)
    for result in results:
        error = result.get("error")
        assert isinstance(error, DistributedRunError), result
        assert error.failures == [(1, "FloatingPointError: NaN in rank 1's shard")]
        assert "featurisation failed on rank 1" in str(error)


def test_together_reraises_unchanged_in_one_process():
    with pytest.raises(KeyError):
        with together(ProcessGroup(), "work"):
            raise KeyError("x")


def _search(path: str, queries, k: int, shard_rows: int):
    from source_proj.features.store import FeatureStore
    from source_proj.retrieval.exact import SearchSettings, exact_proponents_opponents

    settings = SearchSettings(shard_rows=shard_rows, block_rows=32, screen_bf16=False)
    found = exact_proponents_opponents(FeatureStore.open(path), queries, k, settings=settings, progress=False)
    return [(t.scores, t.ids) for t in found]


def test_distributed_exact_topk_equals_one_process(tmp_path):
    import numpy as np
    from store_helpers import chunk_features, dense_store

    features = chunk_features(0, 700, 24)
    dense_store(tmp_path / "s.zarr", features, chunk_rows=50)
    queries = np.random.default_rng(0).standard_normal((9, 24)).astype(np.float32)
    # 100-row shards: 7 shards dealt to 3 ranks unevenly; k larger than one shard's rows.
    args = (str(tmp_path / "s.zarr"), queries, 130, 100)
    torch.set_num_threads(1)  # the ranks run one thread each: the same BLAS code paths
    try:
        single = _search(*args)
    finally:
        torch.set_num_threads(2)
    for world in (2, 3):
        for rank, result in enumerate(run_ranks(world, _search, args, tmp_path)):
            assert "ok" in result, result.get("traceback")
            for (scores, ids), (ref_scores, ref_ids) in zip(result["ok"], single):
                np.testing.assert_array_equal(ids, ref_ids, err_msg=f"world {world} rank {rank}")
                np.testing.assert_array_equal(scores, ref_scores)
    # And the one-process search is the true top-k (float64 oracle).
    dense = queries.astype(np.float64) @ features.astype(np.float64).T
    np.testing.assert_array_equal(single[0][1], np.argsort(-dense, axis=1)[:, :130])


def _scores_on_rank_zero_only() -> torch.Tensor | None:
    """In a program that initialised torch.distributed for itself, rank 0 alone fits and scores
    (the other ranks do nothing): no collective may wait for them."""
    if torch.distributed.get_rank() != 0:
        return None
    model, trajectory, (x, y) = trained_classifier(n=44)
    attributor = SourceAttributor(model, "classification", trajectory, proj_dim=16, num_segments=2, progress=False)
    attributor.fit((x, y))
    return attributor.score((x[:5], y[:5]))


def test_library_calls_inside_an_initialised_group_run_on_one_rank(tmp_path):
    model, trajectory, (x, y) = trained_classifier(n=44)
    alone = SourceAttributor(model, "classification", trajectory, proj_dim=16, num_segments=2, progress=False)
    alone.fit((x, y))
    expected = alone.score((x[:5], y[:5]))
    results = run_ranks(2, _scores_on_rank_zero_only, (), tmp_path, timeout=120, share=False)
    assert "ok" in results[0], results[0].get("traceback")
    torch.testing.assert_close(results[0]["ok"], expected, rtol=1e-5, atol=1e-7)
    assert results[1] == {"ok": None}
