"""A SourceAttributor's features in a feature store: resumption and checkpoint fingerprints."""

import shutil

import numpy as np
import pytest
import torch
from tiny_models import blobs, mlp

from source_proj.attributor import SourceAttributor
from source_proj.evaluation.training import TrainSettings, train_sgd
from source_proj.features.errors import StoreMismatchError
from source_proj.gradients.tasks import ClassificationTask
from source_proj.store_fit import fit_store, open_store
from source_proj.trajectory.checkpoints import Checkpoint

SETTINGS = TrainSettings(epochs=3, batch_size=8, lr=0.05, momentum=0.9, weight_decay=1e-3, checkpoints_per_epoch=1)


def _run(folder):
    x, y = blobs(40, 4, 3, seed=0)
    model = mlp((4, 6, 3), 0)
    ckpts = train_sgd(model, ClassificationTask(), x, y, SETTINGS, checkpoint_dir=folder)
    return model, SETTINGS.trajectory(ckpts), (x, y)


def _attributor(model, traj, **settings):
    return SourceAttributor(model, "classification", traj, proj_dim=16, chunk_size=4, progress=False, **settings)


# The grouped projection's shares, measured when the fit began, come back from the store on resume.
@pytest.mark.parametrize("settings", [{}, {"proj_structure": "grouped", "curvature_blocks": "layer"}])
def test_interrupted_fit_resumes_from_stored_curvature_with_identical_features(tmp_path, monkeypatch, settings):
    model, traj, train = _run(tmp_path / "ckpts")
    whole, _ = fit_store(_attributor(model, traj, **settings), train, tmp_path / "whole.zarr", chunk_rows=8)

    broken = _attributor(model, traj, **settings)
    calls = {"n": 0}
    original = broken.featurize_rows

    def failing(examples, start, stop):
        calls["n"] += 1
        if calls["n"] > 5:  # dies in the middle of the third store chunk
            raise KeyboardInterrupt
        return original(examples, start, stop)

    monkeypatch.setattr(broken, "featurize_rows", failing)
    with pytest.raises(KeyboardInterrupt):
        fit_store(broken, train, tmp_path / "resumed.zarr", chunk_rows=8)

    resumed = _attributor(model, traj, **settings)
    monkeypatch.setattr(resumed, "checkpoint_hessian", lambda *a: pytest.fail("curvature recomputed on resume"))
    monkeypatch.setattr(resumed, "measure_projection", lambda *a: pytest.fail("shares measured again on resume"))
    store, report = fit_store(resumed, train, tmp_path / "resumed.zarr", chunk_rows=8)
    assert store.is_complete
    assert report.computed_chunks == (2, 3, 4) and report.skipped_chunks == 2  # nothing done twice
    np.testing.assert_array_equal(store.read_rows(0, 40), whole.read_rows(0, 40))
    np.testing.assert_array_equal(store.self_influence(), whole.self_influence())
    # ...and equal to the in-memory attributor.
    memory = _attributor(model, traj, **settings).fit(train)
    assert resumed.projection == memory.projection
    np.testing.assert_allclose(store.read_rows(0, 40), memory.train_features.numpy(), rtol=1e-6, atol=1e-9)


def test_moved_checkpoints_keep_the_store_valid_but_changed_contents_do_not(tmp_path):
    model, traj, train = _run(tmp_path / "ckpts")
    fit_store(_attributor(model, traj), train, tmp_path / "s.zarr", chunk_rows=16)
    shutil.move(tmp_path / "ckpts", tmp_path / "moved")
    moved = SETTINGS.trajectory([
        Checkpoint(str(tmp_path / "moved" / f"ckpt-0-{i}.pt"), c.steps, c.lr, c.stage) for i, c in enumerate(traj.checkpoints)
    ])
    open_store(_attributor(model, moved), tmp_path / "s.zarr")  # no error: same contents
    state = torch.load(tmp_path / "moved" / "ckpt-0-1.pt", weights_only=True)
    state["0.bias"] = state["0.bias"] + 1e-4
    torch.save(state, tmp_path / "moved" / "ckpt-0-1.pt")
    with pytest.raises(StoreMismatchError, match="checkpoint_digests"):
        open_store(_attributor(model, moved), tmp_path / "s.zarr")
