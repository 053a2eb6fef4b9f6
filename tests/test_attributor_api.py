"""Trajectory segmenting, data forms, parameter selection, multi-stage attribution and bad input."""

import math

import numpy as np
import pytest
import torch
from tiny_models import (
    blobs,
    dense_source_scores,
    mlp,
    projection_matrix,
    trained_classifier,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from source_proj.attributor import SourceAttributor
from source_proj.curvature.spectra import segment_spectra
from source_proj.evaluation.training import TrainSettings, train_sgd
from source_proj.gradients.data import as_examples
from source_proj.gradients.per_example import NonFiniteError
from source_proj.gradients.tasks import ClassificationTask
from source_proj.trajectory.checkpoints import Checkpoint, Trajectory, TrajectoryError


def rel_err(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


# ----------------------------------------------------------------- segmenting
def test_segments_split_stages_and_average_rates_with_momentum_factor():
    state = {"w": torch.zeros(1)}
    ckpts = [Checkpoint(state, steps=10, lr=0.1, stage="a") for _ in range(4)]
    ckpts += [Checkpoint(state, steps=4, lr=[0.1, 0.2, 0.3, 0.4], stage="b") for _ in range(2)]
    traj = Trajectory(tuple(ckpts), optimizer="momentum", momentum=0.5)
    segs = traj.segments(2)
    assert [s.checkpoints for s in segs] == [(0, 1), (2, 3), (4,), (5,)]
    assert [s.stage for s in segs] == ["a", "a", "b", "b"]
    assert segs[0].steps == 20 and math.isclose(segs[0].lr, 0.1 / 0.5)
    assert math.isclose(segs[2].lr, 0.25 / 0.5) and math.isclose(segs[2].time, 0.25 / 0.5 * 4)
    plain = traj.segments(2, momentum_factor=False)
    assert math.isclose(plain[0].lr, 0.1)
    scaled = traj.segments(2, time_scale=0.3)
    assert math.isclose(scaled[0].time, 0.3 * 0.1 / 0.5 * 20) and math.isclose(scaled[3].lr, 0.3 * 0.25 / 0.5)


@pytest.mark.parametrize(
    "ckpt,match",
    [
        (dict(steps=0, lr=0.1), "steps must be a positive int"),
        (dict(steps=-3, lr=0.1), "steps must be a positive int"),
        (dict(steps=5, lr=0.0), "learning rates must be finite and > 0"),
        (dict(steps=5, lr=-0.1), "learning rates must be finite and > 0"),
        (dict(steps=5, lr=float("nan")), "learning rates must be finite and > 0"),
        (dict(steps=3, lr=[0.1, 0.1]), "a learning-rate history must have one rate per step"),
    ],
)
def test_bad_steps_and_rates_are_named(ckpt, match):
    good = Checkpoint({"w": torch.zeros(1)}, steps=1, lr=0.1)
    with pytest.raises(TrajectoryError, match=f"checkpoint 1: {match}"):
        Trajectory((good, Checkpoint({"w": torch.zeros(1)}, **ckpt)))


def test_too_many_segments_and_interleaved_stages_are_errors():
    state = {"w": torch.zeros(1)}
    traj = Trajectory(tuple(Checkpoint(state, 1, 0.1) for _ in range(2)))
    with pytest.raises(TrajectoryError, match="num_segments=3 is larger than the 2 checkpoint"):
        traj.segments(3)
    with pytest.raises(TrajectoryError, match="must be contiguous"):
        Trajectory((Checkpoint(state, 1, 0.1, "a"), Checkpoint(state, 1, 0.1, "b"), Checkpoint(state, 1, 0.1, "a")))
    with pytest.raises(TrajectoryError, match="momentum"):
        Trajectory((Checkpoint(state, 1, 0.1),), optimizer="sgd", momentum=0.9)


# ------------------------------------------------------------------ bad input
def test_checkpoint_keys_or_shapes_that_do_not_fit_the_model_are_named():
    model, traj, _ = trained_classifier()
    bad_keys = dict(traj.checkpoints[1].load())
    bad_keys["extra.weight"] = bad_keys.pop("2.weight")
    broken = Trajectory((traj.checkpoints[0], Checkpoint(bad_keys, 5, 0.05)))
    with pytest.raises(TrajectoryError, match=r"checkpoint 1: state dict keys.*missing \['2.weight'\].*unexpected \['extra.weight'\]"):
        SourceAttributor(model, "classification", broken, proj_dim=8, num_segments=1)
    bad_shape = dict(traj.checkpoints[1].load())
    bad_shape["0.bias"] = torch.zeros(7)
    broken = Trajectory((traj.checkpoints[0], Checkpoint(bad_shape, 5, 0.05)))
    with pytest.raises(TrajectoryError, match=r"checkpoint 1: shapes do not match.*0.bias: \(7,\) vs model \(6,\)"):
        SourceAttributor(model, "classification", broken, proj_dim=8, num_segments=1)


def test_non_finite_gradients_name_the_checkpoint():
    model, traj, train = trained_classifier()
    poisoned = dict(traj.checkpoints[2].load())
    poisoned["0.weight"] = poisoned["0.weight"].clone()
    poisoned["0.weight"][0, 0] = float("nan")
    ckpts = list(traj.checkpoints)
    ckpts[2] = Checkpoint(poisoned, ckpts[2].steps, ckpts[2].lr)
    bad = Trajectory(tuple(ckpts), optimizer="momentum", momentum=0.9)
    with pytest.raises(NonFiniteError, match="checkpoint 2"):
        SourceAttributor(model, "classification", bad, proj_dim=8, progress=False).fit(train)


def test_bad_settings_and_empty_data():
    model, traj, train = trained_classifier()
    for dim in (0, -4):
        with pytest.raises(ValueError, match="proj_dim must be a positive int"):
            SourceAttributor(model, "classification", traj, proj_dim=dim)
    att = SourceAttributor(model, "classification", traj, proj_dim=8, progress=False)
    with pytest.raises(ValueError, match="training data is empty"):
        att.fit((train[0][:0], train[1][:0]))
    with pytest.raises(ValueError, match="different lengths"):
        att.fit((train[0], train[1][:-1]))
    with pytest.raises(RuntimeError, match="call fit"):
        att.score(train)


# ------------------------------------------------------------------ data forms
def test_dataset_dataloader_and_tensors_give_identical_scores():
    model, traj, (x, y) = trained_classifier()
    queries = blobs(3, 4, 3, seed=4)
    kw = dict(proj_dim=16, progress=False, chunk_size=7)
    ref = SourceAttributor(model, "classification", traj, **kw).fit((x, y)).score(queries)
    ds = TensorDataset(x, y)
    for data in (ds, DataLoader(ds, batch_size=5, shuffle=False)):
        got = SourceAttributor(model, "classification", traj, **kw).fit(data).score(queries)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2, 3), nn.Linear(2, 3)

    def forward(self, u, v):
        return self.a(u) + self.b(v)


class OneInput(TwoInputs):
    def forward(self, x):
        return super().forward(x[:, :2], x[:, 2:])


def test_tuple_inputs_equal_the_same_model_on_one_concatenated_input():
    x, y = blobs(30, 4, 3, seed=2)
    one = OneInput()
    st = TrainSettings(epochs=2, momentum=0.0, weight_decay=0.0, checkpoints_per_epoch=1)
    traj = st.trajectory(train_sgd(one, ClassificationTask(), x, y, st))
    queries = blobs(4, 4, 3, seed=8)
    kw = dict(proj_dim=64, num_segments=1, progress=False)
    ref = SourceAttributor(one, "classification", traj, **kw).fit((x, y)).score(queries)
    two = SourceAttributor(TwoInputs(), "classification", traj, **kw).fit(((x[:, :2], x[:, 2:]), y))
    got = two.score(((queries[0][:, :2], queries[0][:, 2:]), queries[1]))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    assert ref.abs().max() > 1e-3


def test_parameter_selection_equals_model_with_those_weights_as_buffers():
    model, traj, train = trained_classifier()
    queries = blobs(3, 4, 3, seed=6)

    class Frozen(nn.Module):  # the first layer as buffers: constants by construction
        def __init__(self):
            super().__init__()
            self.register_buffer("w0", torch.zeros(6, 4))
            self.register_buffer("b0", torch.zeros(6))
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            return self.head(torch.tanh(x @ self.w0.T + self.b0))

    frozen_ckpts = [Checkpoint({"w0": c.load()["0.weight"], "b0": c.load()["0.bias"],
                                "head.weight": c.load()["2.weight"], "head.bias": c.load()["2.bias"]}, c.steps, c.lr)
                    for c in traj.checkpoints]
    frozen_traj = Trajectory(tuple(frozen_ckpts), optimizer="momentum", momentum=0.9, weight_decay=1e-3)
    kw = dict(proj_dim=32, progress=False)
    selected = SourceAttributor(model, "classification", traj, param_names=["2.weight", "2.bias"], **kw)
    ref = SourceAttributor(Frozen(), "classification", frozen_traj, **kw).fit(train).score(queries)
    torch.testing.assert_close(selected.fit(train).score(queries), ref, rtol=1e-4, atol=1e-7)
    assert selected.model_fn.num_params() == 21
    with pytest.raises(ValueError, match="unknown parameter names"):
        SourceAttributor(model, "classification", traj, param_names=["nope"], **kw)


# ----------------------------------------------------------------- multi-stage
def two_stage_run():
    x1, y1 = blobs(24, 4, 3, seed=0)
    x2, y2 = blobs(20, 4, 3, seed=1)
    model = mlp((4, 6, 3), 0)
    st = TrainSettings(epochs=2, batch_size=8, lr=0.05, momentum=0.9, weight_decay=1e-3, checkpoints_per_epoch=1)
    ck = train_sgd(model, ClassificationTask(), x1, y1, st, stage="pre")
    ck += train_sgd(model, ClassificationTask(), x2, y2, st, stage="fine")
    return model, st.trajectory(ck), (x1, y1), (x2, y2)


def test_stage_one_attribution_after_stage_two_matches_dense_formula():
    model, traj, stage1, stage2 = two_stage_run()
    queries = blobs(4, 4, 3, seed=3)
    k = 12
    att = SourceAttributor(model, "classification", traj, proj_dim=k, num_segments=2, progress=False)
    got = att.fit(stage1, stages=["pre"], curvature_data={"fine": stage2}).score(queries).numpy()
    p = sum(q.numel() for q in model.parameters())
    dense = dense_source_scores(model, ClassificationTask(), traj, stage1, queries, projection_matrix(0, p, k), 2,
                                attributed_stages=("pre",), curvature_data={"fine": stage2})
    assert rel_err(got, dense) < 2e-4
    with pytest.raises(ValueError, match=r"stages \['fine'\] have no curvature data"):
        SourceAttributor(model, "classification", traj, proj_dim=k, num_segments=2, progress=False).fit(stage1, stages=["pre"])


def test_per_stage_scores_add_up_and_isolate_a_stage():
    model, traj, stage1, stage2 = two_stage_run()
    both = (torch.cat([stage1[0], stage2[0]]), torch.cat([stage1[1], stage2[1]]))
    queries = blobs(4, 4, 3, seed=3)
    att = SourceAttributor(model, "classification", traj, proj_dim=12, num_segments=2, progress=False,
                           keep_segment_features=True).fit(both)
    total = att.score(queries)
    pre, fine = att.score(queries, stage="pre"), att.score(queries, stage="fine")
    torch.testing.assert_close(pre + fine, total, rtol=1e-5, atol=1e-7)
    only_pre = SourceAttributor(model, "classification", traj, proj_dim=12, num_segments=2, progress=False)
    only_pre.fit(both, stages=["pre"], curvature_data=both)
    torch.testing.assert_close(only_pre.score(queries), pre, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(pre, fine)
    with pytest.raises(TrajectoryError, match="unknown stage 'warmup'"):
        att.score(queries, stage="warmup")
    no_segments = SourceAttributor(model, "classification", traj, proj_dim=12, num_segments=2, progress=False,
                                   query_mode="final").fit(both)
    with pytest.raises(ValueError, match="keep_segment_features=True"):
        no_segments.score(queries, stage="pre")


def test_staged_form_scores_the_last_stage_per_segment_and_carries_the_earlier_one():
    """The default on two stages ("staged") equals the per-segment form on the last stage's
    rows and the paper's form on the earlier stage's (each checked against the dense formula
    above and in test_source_oracles), and splits by stage without per-segment features."""
    model, traj, stage1, stage2 = two_stage_run()
    both = (torch.cat([stage1[0], stage2[0]]), torch.cat([stage1[1], stage2[1]]))
    queries = blobs(4, 4, 3, seed=3)
    kw = dict(proj_dim=12, num_segments=2, progress=False)
    staged = SourceAttributor(model, "classification", traj, **kw).fit(both)
    assert staged.query_mode == "staged" and staged.train_features.shape[1] == 12 * 3  # 2 own blocks + 1 carried
    fine = SourceAttributor(model, "classification", traj, query_mode="segment", **kw)
    fine.fit(both, stages=["fine"], num_train=len(both[1]))
    pre = SourceAttributor(model, "classification", traj, query_mode="final", **kw)
    pre.fit(both, stages=["pre"], num_train=len(both[1]), curvature_data=both)
    torch.testing.assert_close(staged.score(queries, stage="fine"), fine.score(queries), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(staged.score(queries, stage="pre"), pre.score(queries), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(staged.score(queries), fine.score(queries) + pre.score(queries), rtol=1e-5, atol=1e-7)
    # Self-influence: minus each row's score on its own loss, in the staged layout.
    self_scores = staged.query_features(both, measurement=ClassificationTask().loss) @ staged.train_features.T
    torch.testing.assert_close(staged.self_influence().float(), -self_scores.diagonal(), rtol=1e-4, atol=1e-7)


def test_segment_query_mode_and_self_influence_match_their_definitions():
    model, traj, train = trained_classifier()
    att = SourceAttributor(model, "classification", traj, proj_dim=16, num_segments=2, progress=False,
                           query_mode="segment").fit(train)
    # Self-influence = -(score of each row on its own loss), from the public pieces.
    self_scores = att.query_features(train, measurement=ClassificationTask().loss) @ att.train_features.T
    torch.testing.assert_close(att.self_influence().float(), -self_scores.diagonal(), rtol=1e-4, atol=1e-7)
    final = SourceAttributor(model, "classification", traj, proj_dim=16, num_segments=2, progress=False).fit(train)
    self_scores = final.query_features(train, measurement=ClassificationTask().loss) @ final.train_features.T
    torch.testing.assert_close(final.self_influence().float(), -self_scores.diagonal(), rtol=1e-4, atol=1e-7)
    assert (final.self_influence() > 0).float().mean() > 0.8  # including a row mostly lowers its own loss


@pytest.mark.parametrize("query_mode,attributed,unused",
                         [("segment", "pre", "fine"), ("final", "fine", "pre"), ("staged", "fine", "pre")])
def test_stages_whose_curvature_cannot_matter_need_no_curvature_data(query_mode, attributed, unused):
    """Segment mode never transports, final mode transports only forward, and staged mode
    transports only the earlier stages' terms: the unused
    stage's Hessians are skipped (no curvature data needed), and putting its real spectra
    back changes no score."""
    model, traj, stage1, stage2 = two_stage_run()
    rows = {"pre": stage1, "fine": stage2}
    queries = blobs(4, 4, 3, seed=3)
    kw = dict(proj_dim=12, num_segments=2, progress=False, query_mode=query_mode)
    att = SourceAttributor(model, "classification", traj, **kw).fit(rows[attributed], stages=[attributed])
    skipped = [l for l, seg in enumerate(att.segments) if seg.stage == unused]
    assert skipped and all(att.spectra[l].eigenvalues.abs().max() == 0 for l in skipped)
    # Every segment's real spectrum, the unused stage's from its own data.
    hessians = {
        c: att.checkpoint_hessian(c, as_examples(rows[traj.checkpoints[c].stage]))
        for seg in att.segments for c in seg.checkpoints
    }
    full = segment_spectra(att.segments, hessians, traj.weight_decay)
    assert all(full[l].eigenvalues.abs().max() > 0 for l in skipped)
    scores = att.query_features(queries) @ att.train_features.T
    att.set_curvature(full, att.weights.tolist())
    features = att.featurize_range(as_examples(rows[attributed]), 0, len(rows[attributed][0])).features
    torch.testing.assert_close(att.query_features(queries) @ features.T, scores, rtol=1e-6, atol=1e-9)


def test_check_finite_fast_path_neither_misses_nor_invents():
    from source_proj.gradients.per_example import check_finite

    check_finite(torch.full((3, 4), 3e38), "large values")  # their sum overflows; they are finite
    for bad in (math.nan, math.inf, -math.inf):
        values = torch.ones(3, 4)
        values[1, 2] = bad
        with pytest.raises(NonFiniteError, match=r"in values \(first bad rows \[1\] of the batch\)"):
            check_finite(values, "values")


def test_later_fits_reuse_the_checkpoint_hessians_of_the_same_curvature_rows(monkeypatch):
    """Fitting each stage's rows in turn computes the later stage's Hessians once; the scores
    equal a fresh attributor's bit for bit, and other curvature rows are computed anew."""
    model, traj, stage1, stage2 = two_stage_run()
    queries = blobs(4, 4, 3, seed=3)
    kw = dict(proj_dim=12, num_segments=2, progress=False)
    calls = []
    original = SourceAttributor.checkpoint_hessian

    def counted(self, index, examples):
        calls.append(index)
        return original(self, index, examples)

    monkeypatch.setattr(SourceAttributor, "checkpoint_hessian", counted)
    fine_checkpoints = {c for c, ck in enumerate(traj.checkpoints) if ck.stage == "fine"}
    curvature = {"pre": stage1, "fine": stage2}
    att = SourceAttributor(model, "classification", traj, **kw).fit(stage2, stages=["fine"], curvature_data=curvature)
    assert set(calls) == fine_checkpoints
    calls.clear()
    att.fit(stage1, stages=["pre"], curvature_data=curvature)
    assert calls and not set(calls) & fine_checkpoints  # only the earlier stage's are new
    fresh = SourceAttributor(model, "classification", traj, **kw).fit(stage1, stages=["pre"], curvature_data=curvature)
    assert torch.equal(att.score(queries), fresh.score(queries))
    calls.clear()
    fewer = {"pre": stage1, "fine": (stage2[0][:10], stage2[1][:10])}
    att.fit(stage1, stages=["pre"], curvature_data=fewer)
    assert fine_checkpoints <= set(calls)
    other = SourceAttributor(model, "classification", traj, **kw).fit(stage1, stages=["pre"], curvature_data=fewer)
    assert torch.equal(att.score(queries), other.score(queries))


def test_the_last_queries_features_are_kept_and_other_queries_computed(monkeypatch):
    model, traj, train = trained_classifier()
    queries, other = blobs(5, 4, 3, seed=9), blobs(5, 4, 3, seed=10)
    att = SourceAttributor(model, "classification", traj, proj_dim=8, progress=False).fit(train)
    first = att.query_features(queries)
    calls = []
    original = SourceAttributor._projected_sum

    def counted(self, *args):
        calls.append(args[0])
        return original(self, *args)

    monkeypatch.setattr(SourceAttributor, "_projected_sum", counted)
    again = att.query_features(queries)
    assert not calls and torch.equal(again, first)
    again.zero_()  # the kept copy is not the caller's
    assert torch.equal(att.query_features(queries), first)
    fresh = SourceAttributor(model, "classification", traj, proj_dim=8, progress=False)
    assert torch.equal(att.query_features(other), fresh.query_features(other)) and calls
    calls.clear()
    loss = ClassificationTask().loss  # another measurement is computed, not taken from the kept ones
    assert not torch.equal(att.query_features(other, measurement=loss), att.query_features(other)) and calls
