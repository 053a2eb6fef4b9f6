"""One query against a store, without work that is not its gradients or the search: the fit's
rank-one fits of Adam's D^{1/2} are reused (``store_fit.FITS_FILE``), only for the optimizer
states they were fitted from; a one-row query set's activations are not measured."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from tiny_models import blobs
from torch import nn

from source_proj.attributor import SourceAttributor
from source_proj.errors import InputError
from source_proj.evaluation.training import AdamWSettings, train_adamw
from source_proj.gradients.tasks import ClassificationTask
from source_proj.projection.kronecker import FactoredProjection
from source_proj.store_fit import FITS_FILE, load_rank_one_fits
from source_proj.trajectory.checkpoints import Trajectory

SETTINGS = dict(proj_dim=70, proj_structure="factored", kronecker_terms=2, progress=False)


def _run():
    x, y = blobs(24, 12, 5, seed=0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))
    settings = AdamWSettings(epochs=3, batch_size=6, lr=0.02, weight_decay=0.05, checkpoints_per_epoch=1)
    return model, settings.trajectory(train_adamw(model, ClassificationTask(), x, y, settings)), x, y


def _counting(monkeypatch, owner, name: str) -> list[int]:
    """Calls of ``owner.name`` from now on (one entry per call)."""
    calls = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def _count_fits(monkeypatch) -> list[int]:
    return _counting(monkeypatch, FactoredProjection, "fit_scale")


def test_a_reopened_store_takes_the_fits_and_answers_as_fitting_them_again(tmp_path, monkeypatch):
    model, traj, x, y = _run()
    path = tmp_path / "store"
    SourceAttributor(model, "classification", traj, **SETTINGS).fit((x, y), store=path)
    assert len(load_rank_one_fits(path)) == len(traj.checkpoints)  # every checkpoint was fitted once
    calls = _count_fits(monkeypatch)
    cached = SourceAttributor(model, "classification", traj, **SETTINGS).use_store(path)
    q_cached, top_cached = cached.query_features((x[:3], y[:3])), cached.topk((x[:3], y[:3]), 4, kind="proponents")
    assert calls == []
    # Oracle: the same query with the fits computed again (the cache file unreadable).
    (path / FITS_FILE).write_bytes(b"not a torch file")
    assert load_rank_one_fits(path) == {}
    fresh = SourceAttributor(model, "classification", traj, **SETTINGS).use_store(path)
    q_fresh = fresh.query_features((x[:3], y[:3]))
    assert len(calls) == len(cached.query_form.query_checkpoints(cached.segments, len(traj.checkpoints)))
    torch.testing.assert_close(q_cached, q_fresh, rtol=0, atol=0)
    top_fresh = fresh.topk((x[:3], y[:3]), 4, kind="proponents")
    assert (top_cached.ids == top_fresh.ids).all()


def test_fits_of_another_optimizer_state_are_not_taken(monkeypatch):
    model, traj, x, y = _run()
    first = SourceAttributor(model, "classification", traj, **SETTINGS)
    last = len(traj.checkpoints) - 1
    for c in range(len(traj.checkpoints)):
        first.gradient_scale(c)
    # The last checkpoint's second moments changed (one weight's v times 4): its fit differs.
    state = copy.deepcopy(traj.checkpoints[last].optimizer_state)
    state["state"][0]["exp_avg_sq"] *= 4
    changed = Trajectory(
        (*traj.checkpoints[:last], dataclasses.replace(traj.checkpoints[last], optimizer_state=state)),
        optimizer=traj.optimizer, weight_decay=traj.weight_decay, betas=traj.betas, eps=traj.eps,
    )
    second = SourceAttributor(model, "classification", changed, **SETTINGS)
    second.use_rank_one_fits(first.rank_one_fits())
    calls = _count_fits(monkeypatch)
    for c in range(last):  # unchanged states: the stored fits, equal to the first attributor's
        taken, own = second.gradient_scale(c), first.gradient_scale(c)
        for name, (a, b) in own.rank_one.items():
            torch.testing.assert_close(taken.rank_one[name], (a, b), rtol=0, atol=0)
    assert calls == []
    refit = second.gradient_scale(last)
    assert len(calls) == 1
    expected = second.projection.fit_scale(second.preconditioner.sqrt_scale(last))
    weight = next(iter(expected.rank_one))
    torch.testing.assert_close(refit.rank_one[weight], expected.rank_one[weight], rtol=0, atol=0)
    stale = first.gradient_scale(last).rank_one[weight]
    assert not torch.allclose(refit.rank_one[weight][0], stale[0], rtol=1e-3)


def test_one_query_is_checked_without_measuring_its_activations(monkeypatch):
    """A one-row query set is one chunk whatever its activations; its labels are still checked."""
    import source_proj.attributor as attributor_module

    model, traj, x, y = _run()
    measured = _counting(monkeypatch, attributor_module, "activation_cost")
    att = SourceAttributor(model, "classification", traj, **SETTINGS).fit((x, y))
    assert measured == [1]  # the training data's check measures them
    one = att.query_features((x[:1], y[:1]))
    assert measured == [1]
    two = att.query_features((x[:2], y[:2]))
    assert measured == [1, 1]
    # The same row, the same features (to float32 rounding of a batch of one against two).
    torch.testing.assert_close(one[0], two[0], rtol=1e-4, atol=1e-5 * float(one.abs().max()))
    with pytest.raises(InputError, match="queries"):
        att.query_features((x[:1], torch.tensor([5])))  # label 5 of 5 classes: refused as before


def test_comparing_data_with_a_store_refuses_other_rows_without_measuring_activations(tmp_path, monkeypatch):
    import source_proj.attributor as attributor_module
    from source_proj.features.errors import DataMismatchError
    from source_proj.features.store import FeatureStore
    from source_proj.store_fit import check_training_data

    model, traj, x, y = _run()
    path = tmp_path / "store"
    SourceAttributor(model, "classification", traj, **SETTINGS).fit((x, y), store=path, chunk_rows=8)
    measured = _counting(monkeypatch, attributor_module, "activation_cost")
    att = SourceAttributor(model, "classification", traj, **SETTINGS)
    store = FeatureStore.open(path)
    check_training_data(att, store, (x, y), chunks=[0, store.layout.n_chunks - 1])
    changed = x.clone()
    changed[-1, 0] += 1.0  # a row of the last chunk
    with pytest.raises(DataMismatchError, match="chunk 2"):
        check_training_data(att, store, (changed, y), chunks=[0, store.layout.n_chunks - 1])
    assert measured == []
