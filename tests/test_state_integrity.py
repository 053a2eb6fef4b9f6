"""Optimizer states and checkpoints that do not fit their trajectory (fault injection): each
fault is reproduced and refused before any long work with an error naming the checkpoint and
file, or, for a float16 checkpoint of a float32 model, cast to give the right scores."""

import copy
import dataclasses

import numpy as np
import pytest
import torch
from tiny_models import blobs, mlp, trained_classifier
from torch import nn

from source_proj.attributor import SourceAttributor
from source_proj.evaluation.training import AdamWSettings, train_adamw
from source_proj.gradients.model import ModelFunction
from source_proj.gradients.tasks import ClassificationTask
from source_proj.trajectory.checkpoints import Trajectory, TrajectoryError

# 24 rows in batches of 8: 3 steps per epoch, one checkpoint per epoch.
SETTINGS = AdamWSettings(epochs=4, batch_size=8, lr=0.02, weight_decay=0.05, warmup_fraction=0.2)


@pytest.fixture(scope="module")
def adamw(tmp_path_factory):
    """(model, trajectory with optimizer-*.pt files, data) of a 4-checkpoint AdamW run."""
    x, y = blobs(24, 4, 3, seed=0)
    model = mlp((4, 6, 3), 0)
    folder = tmp_path_factory.mktemp("adamw")
    traj = SETTINGS.trajectory(train_adamw(model, ClassificationTask(), x, y, SETTINGS, checkpoint_dir=folder))
    return model, traj, (x, y)


def attributor(model, traj):
    """Construction reads and checks every state: the errors come before any gradient work."""
    return SourceAttributor(model, "classification", traj, proj_dim=8, num_segments=1, progress=False)


def with_states(traj, states: dict) -> Trajectory:
    """``traj`` with checkpoint c's optimizer state replaced by ``states[c]``."""
    ckpts = [
        dataclasses.replace(c, optimizer_state=states.get(i, c.optimizer_state)) for i, c in enumerate(traj.checkpoints)
    ]
    return dataclasses.replace(traj, checkpoints=tuple(ckpts))


def recorded_step(source) -> float:
    """The step count an optimizer state file or state_dict records (read by hand)."""
    state = torch.load(source, weights_only=True) if isinstance(source, str) else source
    return float(state["state"][0]["step"])


def test_the_run_records_the_trajectorys_steps(adamw):
    _, traj, _ = adamw
    assert [recorded_step(c.optimizer_state) for c in traj.checkpoints] == [3.0, 6.0, 9.0, 12.0]


def test_optimizer_files_swapped_between_first_and_last_checkpoint_are_refused(adamw):
    model, traj, _ = adamw
    first, last = traj.checkpoints[0].optimizer_state, traj.checkpoints[-1].optimizer_state
    swapped = with_states(traj, {0: last, 3: first})
    # Checkpoint 0's state (step 12) could belong to a trajectory that starts mid-run; checkpoint
    # 1's state, 3 steps later, must then say 15, but says 6.
    with pytest.raises(TrajectoryError, match=r"checkpoint 1 \('.*optimizer-0-1.pt'\): the optimizer state says step "
                       r"6, but the trajectory expects step 15: checkpoint 0's state says step 12"):
        attributor(model, swapped)


def test_in_memory_states_swapped_between_neighbours_are_refused(adamw):
    model, traj, _ = adamw
    states = [torch.load(c.optimizer_state, weights_only=True) for c in traj.checkpoints]
    with pytest.raises(TrajectoryError, match=r"^checkpoint 1: the optimizer state says step 9, but the trajectory "
                       r"expects step 6: checkpoint 0's state says step 3"):
        attributor(model, with_states(traj, {1: states[2], 2: states[1]}))


def test_a_state_whose_step_was_edited_is_refused(adamw):
    model, traj, _ = adamw
    edited = torch.load(traj.checkpoints[2].optimizer_state, weights_only=True)
    for entry in edited["state"].values():
        entry["step"] = torch.tensor(1.0)
    with pytest.raises(TrajectoryError, match=r"^checkpoint 2: the optimizer state says step 1, but the trajectory "
                       r"expects step 9"):
        attributor(model, with_states(traj, {2: edited}))
    # The first checkpoint: its state must count at least the trajectory's steps up to it.
    alone = dataclasses.replace(traj.checkpoints[2], optimizer_state=edited, steps=9, lr=0.02)
    with pytest.raises(TrajectoryError, match=r"^checkpoint 0: the optimizer state says step 1, but the trajectory has "
                       r"9 steps up to this checkpoint"):
        attributor(model, dataclasses.replace(traj, checkpoints=(alone,)))


def test_trajectories_that_start_mid_run_or_restart_their_optimizer_per_stage_pass(adamw):
    model, traj, _ = adamw
    names = [n for n, _ in model.named_parameters()]
    full = attributor(model, traj).preconditioner
    # Starting at checkpoint 1: its state also counts the 3 steps before it.
    later = attributor(model, dataclasses.replace(traj, checkpoints=traj.checkpoints[1:])).preconditioner
    for c in range(3):
        for n in names:
            assert torch.equal(later.sqrt_scale(c)[n], full.sqrt_scale(c + 1)[n])
    # One optimizer through two stages (the stage label changes mid-run) ...
    relabelled = [dataclasses.replace(c, stage=int(i >= 2)) for i, c in enumerate(traj.checkpoints)]
    attributor(model, dataclasses.replace(traj, checkpoints=tuple(relabelled)))
    # ... and a fresh AdamW for the second stage, whose states count from 0 again.
    x, y = blobs(24, 4, 3, seed=1)
    second = copy.deepcopy(model)
    ckpts = train_adamw(second, ClassificationTask(), x, y, dataclasses.replace(SETTINGS, epochs=2), stage=1)
    assert [recorded_step(c.optimizer_state) for c in ckpts] == [3.0, 6.0]
    attributor(second, dataclasses.replace(traj, checkpoints=traj.checkpoints + tuple(ckpts)))
    # A fresh optimizer within a stage is no restart: refused.
    with pytest.raises(TrajectoryError, match=r"checkpoint 4: the optimizer state says step 3, but the trajectory "
                       r"expects step 15"):
        same_stage = traj.checkpoints + tuple(dataclasses.replace(c, stage=0) for c in ckpts)
        attributor(second, dataclasses.replace(traj, checkpoints=same_stage))


def test_a_truncated_optimizer_file_is_named(adamw, tmp_path):
    model, traj, _ = adamw
    data = open(traj.checkpoints[-1].optimizer_state, "rb").read()
    cut = tmp_path / "optimizer.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(TrajectoryError, match=r"^checkpoint 3 \('.*optimizer.pt'\): could not load optimizer state "
                       r"file \(missing, truncated or corrupt") as caught:
        attributor(model, with_states(traj, {3: str(cut)}))
    assert "\n" not in str(caught.value)


def test_a_model_weights_file_given_as_optimizer_state_is_recognised(adamw):
    model, traj, _ = adamw
    weights = traj.checkpoints[1].state  # ckpt-0-1.pt: a model state dict of the same names and shapes
    with pytest.raises(TrajectoryError, match=r"^checkpoint 1 \('.*ckpt-0-1.pt'\): not an optimizer state: .* as a "
                       r"model's weights do"):
        attributor(model, with_states(traj, {1: weights}))


def test_a_float16_checkpoint_of_a_float32_model_is_cast():
    model, traj, train = trained_classifier(n=24, epochs=3, ckpts_per_epoch=1)
    half = {k: v.half() for k, v in traj.checkpoints[1].load().items()}
    by_hand = {k: v.float() for k, v in half.items()}  # what load_state_dict would put in the model

    def scores(state):
        ckpts = list(traj.checkpoints)
        ckpts[1] = dataclasses.replace(ckpts[1], state=state)
        t = dataclasses.replace(traj, checkpoints=tuple(ckpts))
        att = SourceAttributor(model, "classification", t, proj_dim=16, num_segments=3, progress=False).fit(train)
        return att.score(blobs(3, 4, 3, seed=5)).numpy()

    reference = scores(by_hand)
    assert np.abs(reference).max() > 1e-4
    np.testing.assert_array_equal(scores(half), reference)


def test_a_float_tensor_for_an_integer_buffer_is_refused():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).eval()
    state = dict(model.state_dict())
    state["1.num_batches_tracked"] = state["1.num_batches_tracked"].double()
    with pytest.raises(TrajectoryError, match=r"^checkpoint 4: tensor types do not match the model: "
                       r"\['1.num_batches_tracked: torch.float64 vs model torch.int64'\]"):
        ModelFunction.build(model).canonical_state(state, "checkpoint 4")
