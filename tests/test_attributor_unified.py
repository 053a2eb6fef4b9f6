"""One attributor over features in memory or in a store: fit, score, top-k, self-influence and
group influence give the same answers either way (issue: one attributor over one storage
interface)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import trained_classifier

from source_proj.attributor import SourceAttributor
from source_proj.features.source import MemoryFeatures
from source_proj.features.store import FeatureStore

SETTINGS = dict(proj_dim=16, num_segments=2, progress=False)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    model, trajectory, (x, y) = trained_classifier(n=60)
    memory = SourceAttributor(model, "classification", trajectory, **SETTINGS).fit((x, y))
    path = tmp_path_factory.mktemp("unified") / "s.zarr"
    stored = SourceAttributor(model, "classification", trajectory, **SETTINGS).fit((x, y), store=path, chunk_rows=16)
    reopened = SourceAttributor(model, "classification", trajectory, **SETTINGS).use_store(path)
    return memory, stored, reopened, (x, y)


def test_the_features_live_where_asked(fitted):
    memory, stored, reopened, _ = fitted
    assert isinstance(memory.features, MemoryFeatures)
    assert isinstance(stored.features, FeatureStore) and isinstance(reopened.features, FeatureStore)


def test_scores_and_self_influence_agree_in_memory_and_in_a_store(fitted):
    memory, stored, reopened, (x, y) = fitted
    queries = (x[:7], y[:7])
    expected = memory.score(queries)
    for other in (stored, reopened):
        torch.testing.assert_close(other.score(queries), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(other.self_influence(), memory.self_influence(), rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(other.group_influence(queries), memory.group_influence(queries), rtol=1e-4, atol=1e-6)


def test_topk_equals_a_sort_of_the_score_matrix(fitted):
    memory, stored, _, (x, y) = fitted
    queries = (x[:5], y[:5])
    scores = memory.score(queries).numpy().astype(np.float64)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :4]
    for attributor in (memory, stored):
        proponents, opponents = attributor.topk(queries, 4)
        np.testing.assert_array_equal(proponents.ids, order)
        np.testing.assert_allclose(proponents.scores, np.take_along_axis(scores, order, 1), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(opponents.ids, np.argsort(scores, axis=1, kind="stable")[:, :4])
        only = attributor.topk(queries, 4, kind="opponents")
        np.testing.assert_array_equal(only.ids, opponents.ids)
    with pytest.raises(ValueError, match="kind must be"):
        memory.topk(queries, 4, kind="best")


def test_a_store_written_with_the_old_metadata_version_opens_for_the_same_attributor(fitted, tmp_path):
    """Stores written before the store's format version became the only one carry the attributor's
    metadata version (1) in their metadata; it is dropped on reading, so they keep opening."""
    from source_proj.features.layout import StoreLayout
    from source_proj.store_fit import _metadata, check_store_settings

    memory, _, _, _ = fitted
    metadata = {**_metadata(memory), "format_version": 1}
    layout = StoreLayout(n_rows=4, dim=memory.features.feature_dim(), dtype="float32", chunk_rows=4)
    old = FeatureStore.create(tmp_path / "old.zarr", layout, metadata)
    assert "format_version" not in FeatureStore.open(old.path).metadata
    check_store_settings(memory, FeatureStore.open(old.path))  # no StoreMismatchError
