"""Optimizer-state digests cached beside a store by file identity: a query against the store
does not read and hash the unchanged Adam state files to check the store, a state file
rewritten since is hashed again and refused by the store check, and one changed with its
identity kept is refused when the query reads it."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch
from tiny_models import blobs, mlp

import source_proj.trajectory.optimizer_state as optimizer_state
from source_proj.attributor import SourceAttributor
from source_proj.evaluation.training import AdamWSettings, train_adamw
from source_proj.features.errors import StoreMismatchError
from source_proj.gradients.tasks import ClassificationTask
from source_proj.store_fit import fit_store, open_store
from source_proj.trajectory.checkpoints import TrajectoryError
from source_proj.trajectory.digests import CACHE_FILE

SETTINGS = dict(proj_dim=8, num_segments=2, progress=False)


@pytest.fixture
def run(tmp_path):
    """A small AdamW run whose checkpoints and optimizer states are files, and a store of it."""
    x, y = blobs(24, 4, 3, seed=0)
    model = mlp((4, 6, 3), 0)
    settings = AdamWSettings(epochs=3, batch_size=8, lr=0.02, weight_decay=0.05, warmup_fraction=0.2)
    trajectory = settings.trajectory(train_adamw(model, ClassificationTask(), x, y, settings, checkpoint_dir=tmp_path))
    store = tmp_path / "s.zarr"
    fit_store(SourceAttributor(model, "classification", trajectory, **SETTINGS), (x, y), store, chunk_rows=8)
    return model, trajectory, (x, y), store


@pytest.fixture
def hashes(monkeypatch):
    """The moments digests computed, by kind: "sha256" (checking a store) and "fast" (a read)."""
    calls: dict[str, int] = {"sha256": 0, "fast": 0}
    digest = optimizer_state.moments_digest

    def counting(moments, fast=False):
        calls["fast" if fast else "sha256"] += 1
        return digest(moments, fast)

    monkeypatch.setattr(optimizer_state, "moments_digest", counting)
    return calls


def _sha256_of_moments(path: str) -> str:
    """The SHA-256 a store records for a state file, computed here from the file: per parameter
    (names of the model in optimizer order, sorted), name|step|shape| then the float32 bytes."""
    state = torch.load(path, weights_only=True)
    names = ["0.bias", "0.weight", "2.bias", "2.weight"]
    order = ["0.weight", "0.bias", "2.weight", "2.bias"]  # the optimizer's parameter ids 0..3
    digest = hashlib.sha256()
    for name in names:
        entry = state["state"][order.index(name)]
        v = entry["exp_avg_sq"].to(torch.float32).contiguous()
        digest.update(f"{name}|{float(entry['step'])!r}|{tuple(v.shape)}|".encode())
        digest.update(v.numpy().tobytes())
    return digest.hexdigest()


def test_an_unchanged_state_file_is_not_hashed_to_check_the_store(run, hashes):
    model, trajectory, (x, y), store = run
    uncached = SourceAttributor(model, "classification", trajectory, **SETTINGS)
    (store / CACHE_FILE).rename(store / "cache.aside")  # the reference: every state read and hashed
    reference = uncached.use_store(store).topk((x[:3], y[:3]), 5, kind="proponents")
    (store / "cache.aside").rename(store / CACHE_FILE)
    hashes.update(sha256=0, fast=0)
    attributor = SourceAttributor(model, "classification", trajectory, **SETTINGS).use_store(store)
    assert hashes == {"sha256": 0, "fast": 0}  # construction and the store check read no moments
    assert list(attributor.preconditioner.digests) == [_sha256_of_moments(c.optimizer_state) for c in trajectory.checkpoints]
    found = attributor.topk((x[:3], y[:3]), 5, kind="proponents")
    needed = {c for group in attributor.query_form.query_checkpoints(attributor.segments, 3) for c in group}
    # The query reads the states it needs, each checked once against the cached fast digest.
    assert hashes == {"sha256": 0, "fast": len(needed)}
    np.testing.assert_array_equal(found.ids, reference.ids)
    np.testing.assert_allclose(found.scores, reference.scores, rtol=0, atol=1e-6)


def test_a_state_file_rewritten_since_is_hashed_again_and_refused(run, hashes):
    model, trajectory, _, store = run
    path = trajectory.checkpoints[1].optimizer_state
    before = os.stat(path)
    state = torch.load(path, weights_only=True)
    for entry in state["state"].values():
        entry["exp_avg_sq"] = entry["exp_avg_sq"] * 4.0  # same steps and shapes, other moments
    torch.save(state, path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert os.stat(path).st_size == before.st_size
    hashes.update(sha256=0, fast=0)
    with pytest.raises(StoreMismatchError, match="optimizer_state_digests"):
        open_store(SourceAttributor(model, "classification", trajectory, **SETTINGS), store)
    assert hashes["sha256"] == 1  # that file alone: the other two come from the cache


def test_a_state_file_changed_with_its_identity_kept_is_refused_when_read(run):
    model, trajectory, (x, y), store = run
    path = trajectory.checkpoints[2].optimizer_state
    before = os.stat(path)
    state = torch.load(path, weights_only=True)
    state["state"][0]["exp_avg_sq"] = state["state"][0]["exp_avg_sq"].flip(0)  # the same bytes, reordered
    torch.save(state, path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_size == before.st_size
    attributor = SourceAttributor(model, "classification", trajectory, **SETTINGS).use_store(store)  # cache: passes
    with pytest.raises(TrajectoryError, match=r"checkpoint 2 \(.*optimizer-.*changed during the run"):
        attributor.topk((x[:3], y[:3]), 5)


def test_without_a_cache_every_state_is_read_and_hashed_when_needed(run, hashes):
    model, trajectory, (x, y), store = run
    hashes.update(sha256=0, fast=0)
    attributor = SourceAttributor(model, "classification", trajectory, **SETTINGS)
    assert hashes == {"sha256": 0, "fast": 0}
    expected = [_sha256_of_moments(c.optimizer_state) for c in trajectory.checkpoints]
    assert list(attributor.preconditioner.digests) == expected  # read and hashed now, once each
    assert hashes == {"sha256": 3, "fast": 3}
    in_memory = SourceAttributor(model, "classification", trajectory, **SETTINGS).fit((x, y))
    (store / CACHE_FILE).unlink()
    from_store = SourceAttributor(model, "classification", trajectory, **SETTINGS).use_store(store)
    assert list(from_store.preconditioner.digests) == expected
    torch.testing.assert_close(from_store.score((x[:3], y[:3])), in_memory.score((x[:3], y[:3])), rtol=1e-5, atol=1e-6)
