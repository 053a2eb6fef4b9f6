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


def _hessians(mode: str) -> list[torch.Tensor]:
    model, trajectory, data = trained_classifier(n=44)
    attributor = SourceAttributor(
        model, "classification", trajectory, proj_dim=16, chunk_size=6, curvature=mode, progress=False
    )
    examples = as_examples(data)
    return [attributor.checkpoint_hessian(i, examples) for i in (0, len(trajectory.checkpoints) - 1)]


@pytest.mark.parametrize("mode", ["exact", "sampled"])
def test_curvature_bit_identical_for_any_world_size(tmp_path, mode):
    torch.set_num_threads(1)  # the ranks run one thread each: same BLAS code paths
    try:
        single = _hessians(mode)
    finally:
        torch.set_num_threads(2)
    for world in (2, 3):
        results = run_ranks(world, _hessians, (mode,), tmp_path)
        for rank, result in enumerate(results):
            assert "ok" in result, result.get("traceback")
            for mine, ref in zip(result["ok"], single):
                assert torch.equal(mine, ref), (world, rank)


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
