"""Learning-rate histories: the recorder against rates read by hand, scheduler replays, and the
AdamW trainer's schedule and optimizer states."""

import math

import pytest
import torch
from tiny_models import blobs, mlp

from source_proj.evaluation.training import AdamWSettings, train_adamw
from source_proj.gradients.tasks import ClassificationTask
from source_proj.trajectory.checkpoints import Checkpoint, Trajectory, TrajectoryError
from source_proj.trajectory.lr_history import LearningRateRecorder, scheduled_rates


def one_cycle(opt):
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=30)


def test_recorder_takes_the_rate_each_step_used_and_a_replay_gives_the_same():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = one_cycle(opt)
    by_hand = []
    with LearningRateRecorder(opt) as recorder:
        chunks = []
        for step in range(30):
            by_hand.append(opt.param_groups[0]["lr"])  # the rate this step will use
            opt.zero_grad()
            model(torch.randn(4, 3)).sum().backward()
            opt.step()
            sched.step()
            if step in (9, 29):
                chunks.append(recorder.take())
    assert [len(c) for c in chunks] == [10, 20] and recorder.steps == 30
    assert list(chunks[0] + chunks[1]) == by_hand
    assert len(set(by_hand)) > 20  # a real schedule, not a constant
    assert scheduled_rates(one_cycle, 0.1, 30) == tuple(by_hand)
    # The hook is gone after the context: later steps are not recorded.
    opt.step()
    assert recorder.steps == 30
    # A history usable as-is by a checkpoint.
    Trajectory((Checkpoint({"w": torch.zeros(1)}, steps=10, lr=chunks[0]),))


def test_different_group_rates_need_a_chosen_group():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.01}])
    shared, chosen = LearningRateRecorder(opt), LearningRateRecorder(opt, group=1)
    opt.step()
    with pytest.raises(ValueError, match=r"step 0 used different learning rates per param group \(\[0.1, 0.01\]\).*group="):
        shared.take()
    assert chosen.take() == (0.01,)
    with pytest.raises(ValueError, match="group 2 out of range"):
        LearningRateRecorder(opt, group=2)


def test_warmup_start_at_zero_is_a_valid_history_but_an_all_zero_one_is_not():
    Trajectory((Checkpoint({"w": torch.zeros(1)}, steps=3, lr=[0.0, 0.1, 0.2]),))
    with pytest.raises(TrajectoryError, match="checkpoint 0: learning rates must be finite and > 0"):
        Trajectory((Checkpoint({"w": torch.zeros(1)}, steps=2, lr=[0.0, 0.0]),))


def test_adamw_trainer_records_its_schedule_and_optimizer_states():
    x, y = blobs(40, 4, 3, seed=0)
    settings = AdamWSettings(epochs=4, batch_size=8, lr=0.01, warmup_fraction=0.25, checkpoints_per_epoch=2)
    ckpts = train_adamw(mlp((4, 6, 3), 0), ClassificationTask(), x, y, settings)
    total = 4 * 5
    rates = [r for c in ckpts for r in (c.lr if isinstance(c.lr, tuple) else [c.lr] * c.steps)]
    expected = [0.01 * (s + 1) / 5 for s in range(5)] + [0.01 * 0.5 * (1 + math.cos(math.pi * s / 15)) for s in range(15)]
    assert len(rates) == total and max(abs(a - b) for a, b in zip(rates, expected)) < 1e-12
    traj = settings.trajectory(ckpts)
    assert traj.optimizer == "adamw" and traj.weight_decay == settings.weight_decay
    for index, ckpt in enumerate(ckpts):
        steps = {float(e["step"]) for e in ckpt.optimizer_state["state"].values()}
        assert steps == {float(traj.cumulative_steps(index))}
    # States are snapshots, not the live optimizer's tensors.
    first, last = ckpts[0].optimizer_state["state"][0], ckpts[-1].optimizer_state["state"][0]
    assert not torch.equal(first["exp_avg_sq"], last["exp_avg_sq"])
