"""Checkpoint digests: cached by file identity so queries need not re-hash, and checked at every
read so a file replaced during a run is refused (integrity round 2: files re-read after their
digest was taken)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
from tiny_models import blobs, mlp, trained_classifier

import source_proj.attributor as attributor_module
from source_proj.attributor import SourceAttributor
from source_proj.evaluation.training import AdamWSettings, train_adamw
from source_proj.gradients.tasks import ClassificationTask
from source_proj.store_fit import fit_store, open_store
from source_proj.trajectory.checkpoints import TrajectoryError
from source_proj.trajectory.digests import CACHE_FILE, FileDigests, state_digests

SETTINGS = dict(proj_dim=16, num_segments=2, progress=False)


@pytest.fixture
def run(tmp_path):
    """A small classifier whose checkpoints are files on disk."""
    model, trajectory, data = trained_classifier(n=48)
    checkpoints = []
    for i, ckpt in enumerate(trajectory.checkpoints):
        path = tmp_path / f"ckpt{i}.pt"
        torch.save(dict(ckpt.state), path)
        checkpoints.append(dataclasses.replace(ckpt, state=path))
    return model, dataclasses.replace(trajectory, checkpoints=tuple(checkpoints)), data


@pytest.fixture
def hashes(monkeypatch):
    """Counts the full (SHA-256) digests the attributor computes."""
    calls = []

    def counting(state):
        calls.append(1)
        return state_digests(state)

    monkeypatch.setattr(attributor_module, "state_digests", counting)
    return calls


def _replace_keeping_time(path, state) -> None:
    before = os.stat(path)
    torch.save(state, path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_queries_against_a_store_reuse_its_digests(run, tmp_path, hashes):
    model, trajectory, (x, y) = run
    store_path = tmp_path / "s.zarr"
    fit_store(SourceAttributor(model, "classification", trajectory, **SETTINGS), (x, y), store_path, chunk_rows=16)
    assert (store_path / CACHE_FILE).is_file()
    count = len(trajectory.checkpoints)
    assert len(hashes) == count  # each checkpoint hashed once by the fit

    hashes.clear()
    query = SourceAttributor(model, "classification", trajectory, **SETTINGS)
    store = open_store(query, store_path)
    assert hashes == []  # every digest from the store's cache
    reference = SourceAttributor(model, "classification", trajectory, **SETTINGS)
    assert reference.checkpoint_digests == query.checkpoint_digests  # a fresh attributor hashes: the same
    assert len(hashes) == count

    hashes.clear()
    os.utime(trajectory.checkpoints[0].state)  # touched: its cached digest no longer holds
    open_store(SourceAttributor(model, "classification", trajectory, **SETTINGS), store_path)
    assert len(hashes) == 1
    assert np.isfinite(store.read_rows(0, 4)).all()


def test_a_checkpoint_replaced_with_its_time_kept_is_caught_when_read(run, tmp_path):
    model, trajectory, (x, y) = run
    store_path = tmp_path / "s.zarr"
    fit_store(SourceAttributor(model, "classification", trajectory, **SETTINGS), (x, y), store_path, chunk_rows=16)
    first, last = trajectory.checkpoints[0].state, trajectory.checkpoints[-1].state
    _replace_keeping_time(last, torch.load(first))  # same size, same time: the cache still matches
    query = SourceAttributor(model, "classification", trajectory, **SETTINGS)
    open_store(query, store_path)  # the settings check trusts the cache ...
    with pytest.raises(TrajectoryError, match=f"checkpoint {len(trajectory.checkpoints) - 1} .*changed during the run"):
        query.query_features((x[:3], y[:3]))  # ... the first read of the file does not


def test_a_checkpoint_replaced_during_a_fit_then_restored_is_refused(run, tmp_path, monkeypatch):
    model, trajectory, (x, y) = run
    reference = tmp_path / "reference.zarr"
    fit_store(SourceAttributor(model, "classification", trajectory, **SETTINGS), (x, y), reference, chunk_rows=16)

    target = trajectory.checkpoints[1].state
    original = torch.load(target)
    other = torch.load(trajectory.checkpoints[0].state)
    featurize = SourceAttributor.featurize_range
    calls = []

    def swapping(self, *args, **kwargs):  # the file replaced between the first and second chunk
        calls.append(1)
        if len(calls) == 2:
            _replace_keeping_time(target, other)
        return featurize(self, *args, **kwargs)

    monkeypatch.setattr(SourceAttributor, "featurize_range", swapping)
    store_path = tmp_path / "s.zarr"
    with pytest.raises(TrajectoryError, match="checkpoint 1 .*changed during the run"):
        fit_store(SourceAttributor(model, "classification", trajectory, **SETTINGS), (x, y), store_path, chunk_rows=16)
    monkeypatch.setattr(SourceAttributor, "featurize_range", featurize)
    _replace_keeping_time(target, original)  # restored: the rerun resumes to the uninterrupted store
    store, _ = fit_store(SourceAttributor(model, "classification", trajectory, **SETTINGS), (x, y), store_path,
                         chunk_rows=16)
    expected = open_store(SourceAttributor(model, "classification", trajectory, **SETTINGS), reference)
    np.testing.assert_array_equal(store.read_rows(0, len(y)), expected.read_rows(0, len(y)))
    np.testing.assert_array_equal(store.self_influence(), expected.self_influence())


def test_the_cache_ignores_an_unreadable_file(tmp_path):
    (tmp_path / CACHE_FILE).write_text("{not json")
    assert FileDigests.load(tmp_path).entries == {}


def test_an_optimizer_state_replaced_after_it_was_checked_is_refused(tmp_path):
    x, y = blobs(24, 4, 3, seed=0)
    model = mlp((4, 6, 3), 0)
    settings = AdamWSettings(epochs=3, batch_size=8, lr=0.02, weight_decay=0.05, warmup_fraction=0.2)
    trajectory = settings.trajectory(train_adamw(model, ClassificationTask(), x, y, settings, checkpoint_dir=tmp_path))
    attributor = SourceAttributor(model, "classification", trajectory, proj_dim=8, num_segments=1, progress=False)
    reference = attributor.preconditioner.moments(1)  # read again: the same state passes
    state_file = trajectory.checkpoints[1].optimizer_state
    state = torch.load(state_file, weights_only=True)
    for entry in state["state"].values():
        entry["exp_avg_sq"] = entry["exp_avg_sq"] * 4.0  # same steps, other moments
    torch.save(state, state_file)
    with pytest.raises(TrajectoryError, match="checkpoint 1 .*changed during the run"):
        attributor.preconditioner.moments(1)
    assert reference.keys() == attributor.preconditioner.moments(0).keys()
