"""A projection per segment (``segment_projections``): each segment's term is the one-matrix
estimator's term of that segment under the segment's own seed.

Oracle: in the per-segment query form the score is sum_l q_l . F_l, and every term depends on
its segment's matrix only; so the score with a matrix per segment must equal the sum over l of
segment l's term taken from an attributor with one matrix of seed ``seed + l`` (itself checked
against dense formulas elsewhere). Self-influence must equal minus the score of each row as a
loss query. Stores record the seeds, and the paper's query form refuses the option.
"""

import numpy as np
import pytest
import torch
from tiny_models import blobs, trained_classifier

from source_proj.attributor import SourceAttributor
from source_proj.features.errors import StoreMismatchError
from source_proj.store_fit import fit_store, open_store, store_config

K, SEED, SEGMENTS = 16, 5, 3


def attributor(model, traj, **kw) -> SourceAttributor:
    kw = {"proj_dim": K, "num_segments": SEGMENTS, "query_mode": "segment", "progress": False, "chunk_size": 8, **kw}
    return SourceAttributor(model, "classification", traj, **kw)


@pytest.mark.parametrize("structure", ["dense", "factored"])
def test_each_segment_term_is_the_one_matrix_term_under_its_own_seed(structure):
    model, traj, train = trained_classifier(n=24, epochs=3, ckpts_per_epoch=2)
    queries = blobs(5, 4, 3, seed=9)
    multi = attributor(model, traj, seed=SEED, segment_projections=True, proj_structure=structure).fit(train)
    expected = torch.zeros(5, 24, dtype=torch.float64)
    for l in range(SEGMENTS):
        one = attributor(model, traj, seed=SEED + l, proj_structure=structure).fit(train)
        k = one.proj_dim
        q = one.query_features(queries)[:, l * k : (l + 1) * k].double()
        expected += q @ one.train_segment_features[:, l].double().T
    got = multi.score(queries).double()
    assert expected.abs().max() > 0
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-8)
    # The terms differ from the one-matrix estimator's (segments 1, 2 use other matrices).
    plain = attributor(model, traj, seed=SEED, proj_structure=structure).fit(train).score(queries).double()
    assert (got - plain).abs().max() > 1e-3 * plain.abs().max()
    # Self-influence: minus each row's score as a loss query.
    as_query = multi.query_features(train, measurement=multi.task.loss).double()
    own = -(as_query * multi.train_features.double()).sum(1)
    np.testing.assert_allclose(multi.self_influence().numpy(), own.numpy(), rtol=1e-5, atol=1e-9)


def test_store_records_the_segment_seeds_and_refuses_the_other_layout(tmp_path):
    model, traj, train = trained_classifier(n=16, epochs=3, ckpts_per_epoch=1)
    store, _ = fit_store(attributor(model, traj, seed=SEED, segment_projections=True), train, tmp_path / "s.zarr",
                         chunk_rows=8)
    assert store.metadata["projection"]["segment_seeds"] == [SEED, SEED + 1, SEED + 2]
    assert store_config(store).segment_projections  # what the CLI's score/topk rebuild from
    with pytest.raises(StoreMismatchError, match="metadata.projection"):
        open_store(attributor(model, traj, seed=SEED), tmp_path / "s.zarr")
    open_store(attributor(model, traj, seed=SEED, segment_projections=True), tmp_path / "s.zarr")


def test_the_paper_form_refuses_segment_projections():
    model, traj, _ = trained_classifier(n=16, epochs=3, ckpts_per_epoch=1)
    with pytest.raises(ValueError, match="segment_projections needs the per-segment query form"):
        attributor(model, traj, query_mode="final", segment_projections=True)


def test_stores_without_the_setting_keep_their_metadata():
    # A store fitted without segment projections records exactly what stores recorded before
    # the setting existed (so those open), and reads back with the setting off.
    from source_proj.config import SourceConfig

    off, on = SourceConfig().recorded_settings(), SourceConfig(segment_projections=True).recorded_settings()
    assert "segment_projections" not in off and on["segment_projections"] is True
    assert SourceConfig(**off) == SourceConfig() and SourceConfig(**on).segment_projections
