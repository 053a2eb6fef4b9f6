"""The query forms against hand-computed layouts."""

import numpy as np
import pytest
import torch

from source_proj.errors import InputError
from source_proj.features.query_forms import query_form
from source_proj.trajectory.checkpoints import Segment

# Two stages: segments 0 and 1 in "a", segment 2 in "b" (the last stage).
SEGMENTS = [Segment("a", (0, 1), 10, 0.1), Segment("a", (2,), 5, 0.1), Segment("b", (3, 4), 8, 0.05)]


def test_layouts_of_the_features():
    final, segment, staged = (query_form(name, SEGMENTS) for name in ("final", "segment", "staged"))
    per_segment = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)  # n=2, L=3, k=4
    assert torch.equal(final.combine(per_segment), per_segment[:, 0] + per_segment[:, 1] + per_segment[:, 2])
    assert torch.equal(segment.combine(per_segment), torch.cat([per_segment[:, l] for l in range(3)], dim=1))
    # staged: the last stage's segment in a block of its own, then the earlier ones summed
    assert torch.equal(staged.combine(per_segment), torch.cat([per_segment[:, 2], per_segment[:, 0] + per_segment[:, 1]], 1))
    mask = torch.tensor([True, False, True])
    assert torch.equal(final.combine(per_segment, mask), per_segment[:, 0] + per_segment[:, 2])
    assert torch.equal(staged.combine(per_segment, mask), torch.cat([per_segment[:, 2], per_segment[:, 0]], 1))
    assert (final.feature_width(4), segment.feature_width(4), staged.feature_width(4)) == (4, 12, 8)


def test_staged_is_the_segment_form_on_one_stage():
    one_stage = [Segment("a", (0,), 4, 0.1), Segment("a", (1, 2), 8, 0.1)]
    staged, segment = query_form("staged", one_stage), query_form("segment", one_stage)
    assert staged.own == segment.own == (True, True)
    per_segment = torch.randn(3, 2, 5)
    assert torch.equal(staged.combine(per_segment), segment.combine(per_segment))


def test_checkpoints_and_curvature_each_form_needs():
    final, segment, staged = (query_form(name, SEGMENTS) for name in ("final", "segment", "staged"))
    assert final.query_checkpoints(SEGMENTS, 5) == [(4,)]
    assert segment.query_checkpoints(SEGMENTS, 5) == [(0, 1), (2,), (3, 4)]
    assert staged.query_checkpoints(SEGMENTS, 5) == [(3, 4), (4,)]
    assert final.curvature_segments([1]) == {1, 2}  # carried through the later segment
    assert segment.curvature_segments([1]) == {1}
    assert staged.curvature_segments([0]) == {0, 1, 2} and staged.curvature_segments([2]) == {2}
    assert (final.carried, segment.carried, staged.carried) == ((True,) * 3, (False,) * 3, (True, True, False))


def test_own_gradients_follow_the_layout():
    staged = query_form("staged", SEGMENTS)
    final_grads, segment_grads = torch.randn(2, 4), torch.randn(2, 3, 4)
    assert torch.equal(staged.own_gradients(final_grads, segment_grads), torch.cat([segment_grads[:, 2], final_grads], 1))
    with pytest.raises(ValueError, match="final checkpoint"):
        staged.own_gradients(None, segment_grads)


def test_restricting_queries_to_segments():
    segment, final, staged = (query_form(name, SEGMENTS) for name in ("segment", "final", "staged"))
    queries = np.arange(2 * 6, dtype=np.float32).reshape(2, 6)  # L=3 blocks of k=2
    restricted, chosen = segment.restrict_queries(queries, [1], stored_segments=False)
    assert chosen is None
    np.testing.assert_array_equal(restricted, queries * np.array([0, 0, 1, 1, 0, 0], dtype=np.float32))
    assert final.restrict_queries(queries, [1], stored_segments=True)[1] == [1]
    with pytest.raises(InputError, match="per-segment features"):
        final.restrict_queries(queries, [1], stored_segments=False)
    # staged (blocks: segment 2, then segments 0 + 1): a whole stage needs no stored segments
    two_blocks = queries[:, :4]
    last, chosen = staged.restrict_queries(two_blocks, [2], stored_segments=False)
    assert chosen is None
    np.testing.assert_array_equal(last, two_blocks * np.array([1, 1, 0, 0], dtype=np.float32))
    earlier, chosen = staged.restrict_queries(two_blocks, [0, 1], stored_segments=False)
    assert chosen is None
    np.testing.assert_array_equal(earlier, two_blocks * np.array([0, 0, 1, 1], dtype=np.float32))
    with pytest.raises(InputError, match="per-segment features"):
        staged.restrict_queries(two_blocks, [1], stored_segments=False)
    with pytest.raises(InputError, match="splits the carried ones"):
        staged.restrict_queries(two_blocks, [1, 2], stored_segments=True)
    with pytest.raises(InputError, match="unknown query form"):
        query_form("paper", SEGMENTS)
