"""The two query forms against hand-computed layouts."""

import numpy as np
import pytest
import torch

from source_proj.errors import InputError
from source_proj.features.query_forms import FINAL, SEGMENT, query_form
from source_proj.trajectory.checkpoints import Segment


def test_layouts_of_the_features():
    per_segment = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)  # n=2, L=3, k=4
    assert torch.equal(FINAL.combine(per_segment), per_segment[:, 0] + per_segment[:, 1] + per_segment[:, 2])
    assert torch.equal(SEGMENT.combine(per_segment), torch.cat([per_segment[:, l] for l in range(3)], dim=1))
    mask = torch.tensor([True, False, True])
    assert torch.equal(FINAL.combine(per_segment, mask), per_segment[:, 0] + per_segment[:, 2])
    assert (FINAL.feature_width(4, 3), SEGMENT.feature_width(4, 3)) == (4, 12)


def test_checkpoints_and_curvature_each_form_needs():
    segments = [Segment("a", (0, 1), 10, 0.1), Segment("a", (2,), 5, 0.1), Segment("b", (3, 4), 8, 0.05)]
    assert FINAL.query_checkpoints(segments, 5) == [(4,)]
    assert SEGMENT.query_checkpoints(segments, 5) == [(0, 1), (2,), (3, 4)]
    assert FINAL.curvature_segments([1], 3) == {1, 2}  # carried through the later segment
    assert SEGMENT.curvature_segments([1], 3) == {1}
    assert (FINAL.transports, SEGMENT.transports) == (True, False)


def test_restricting_queries_to_segments():
    queries = np.arange(2 * 6, dtype=np.float32).reshape(2, 6)  # L=3 blocks of k=2
    restricted, chosen = SEGMENT.restrict_queries(queries, [1], 3, stored_segments=False)
    assert chosen is None
    np.testing.assert_array_equal(restricted, queries * np.array([0, 0, 1, 1, 0, 0], dtype=np.float32))
    assert FINAL.restrict_queries(queries, [1], 3, stored_segments=True)[1] == [1]
    with pytest.raises(InputError, match="per-segment features"):
        FINAL.restrict_queries(queries, [1], 3, stored_segments=False)
    assert query_form("segment") is SEGMENT
    with pytest.raises(InputError, match="unknown query form"):
        query_form("paper")
