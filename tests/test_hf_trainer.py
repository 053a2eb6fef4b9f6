"""The trajectory of a real (tiny) Hugging Face Trainer run, read from its output directory."""

import json
import shutil

import pytest
import torch
from lm_helpers import random_rows, tiny_gpt2

from source_proj.attributor import SourceAttributor
from source_proj.trajectory.checkpoints import Checkpoint, Trajectory, TrajectoryError
from source_proj.trajectory.hf_trainer import (
    step_learning_rates,
    trainer_param_order,
    trainer_trajectory,
)

pytest.importorskip("transformers")
LR, STEPS, SAVE = 0.3, 6, 2


def train_with_trainer(out, rows_seed: int, **optimizer):
    """A tiny GPT-2 trained by transformers.Trainer into ``out`` on 16 random sequences: batch
    4, STEPS steps, a checkpoint every SAVE, a linear schedule, weight decay 0.01 (the Trainer
    exempts biases and LayerNorm weights), ``optimizer`` its optim/learning-rate arguments.
    Returns (trainer, model, data)."""
    import datasets
    from transformers import Trainer, TrainingArguments

    rows = random_rows(16, 10, (8, 8), seed=rows_seed, masked=False)
    data = datasets.Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows],
                                       "labels": [r["labels"] for r in rows]})
    model = tiny_gpt2()
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, max_steps=STEPS, save_steps=SAVE, logging_steps=1,
        weight_decay=0.01, lr_scheduler_type="linear", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        dataloader_num_workers=0, **optimizer,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return trainer, model, data


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    """The SGD Trainer run of :func:`train_with_trainer`."""
    out = tmp_path_factory.mktemp("trainer")
    _, model, data = train_with_trainer(out, 0, optim="sgd", learning_rate=LR)
    return out, model, data


def test_trainer_directory_reproduces_the_hand_built_trajectory(trainer_run):
    out, model, data = trainer_run
    with pytest.warns(UserWarning, match="decay differently"):
        got = trainer_trajectory(out, model=model)
    # By hand: the linear schedule's rate at step s is LR (S - (s - 1)) / S; SGD; decay 0.01 on
    # the decayed group, 0 on biases and LayerNorm weights, weighted by parameter counts.
    shapes = dict(model.named_parameters())
    decayed, exempt = trainer_param_order(model)
    assert "transformer.h.0.ln_1.weight" in exempt and "transformer.h.0.attn.c_attn.bias" in exempt
    count = lambda names: sum(shapes[n].numel() for n in names)
    decay = 0.01 * count(decayed) / (count(decayed) + count(exempt))
    rates = [LR * (STEPS - (s - 1)) / STEPS for s in range(1, STEPS + 1)]
    by_hand = Trajectory(
        tuple(Checkpoint(str(out / f"checkpoint-{s}"), SAVE, rates[s - SAVE : s]) for s in range(SAVE, STEPS + 1, SAVE)),
        optimizer="sgd", weight_decay=decay,
    )
    assert got.optimizer == by_hand.optimizer and got.momentum == 0.0
    assert got.weight_decay == pytest.approx(by_hand.weight_decay, rel=1e-12)
    for a, b in zip(got.checkpoints, by_hand.checkpoints, strict=True):
        assert (a.state, a.steps, a.stage) == (b.state, b.steps, b.stage)
        assert a.lr == pytest.approx(b.lr, rel=1e-12)
    # The weights the folders hold are the model's (tied head key absent from safetensors).
    kw = dict(proj_dim=16, num_segments=3, progress=False)
    scores = SourceAttributor(model, "causal_lm", got, **kw).fit(data).score(data)
    torch.testing.assert_close(scores, SourceAttributor(model, "causal_lm", by_hand, **kw).fit(data).score(data))
    final = SourceAttributor(model, "causal_lm", got, **kw)._state(len(got.checkpoints) - 1)
    for name, value in model.state_dict().items():
        if name != "lm_head.weight":
            torch.testing.assert_close(final[name], value, msg=name)
    with pytest.raises(TrajectoryError, match="pass model= to weigh their decays"):
        trainer_trajectory(out)


def test_sparse_logs_are_interpolated_and_deleted_checkpoints_merge(trainer_run, tmp_path):
    out, model, _ = trainer_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "checkpoint-2")  # as save_total_limit would
    state_file = copy / f"checkpoint-{STEPS}" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["log_history"] = [e for e in state["log_history"] if e.get("step") in (1, 5)]
    state_file.write_text(json.dumps(state))
    with pytest.warns(UserWarning, match="interpolated linearly"):
        got = trainer_trajectory(copy, model=model)
    rates = [LR * (STEPS - (s - 1)) / STEPS for s in range(1, STEPS + 1)]
    assert [c.steps for c in got.checkpoints] == [4, 2]
    assert [r for c in got.checkpoints for r in c.lr] == pytest.approx(rates, rel=1e-12)  # linear: exact


def test_logged_rates_are_placed_by_the_scheduler_states():
    # Trainer versions log the rate of the step (shift 0) or of the next one (shift 1):
    # scheduler.pt (rate after checkpoint step s) decides.
    used = [0.5, 0.4, 0.3, 0.2]
    logs_used = [{"step": s, "learning_rate": used[s - 1]} for s in range(1, 5)]
    logs_next = [{"step": s, "learning_rate": used[s]} for s in range(1, 4)]
    rates, exact = step_learning_rates(logs_used, {2: 0.3}, 4)
    assert exact and rates.tolist() == used
    rates, exact = step_learning_rates(logs_next, {2: 0.3}, 4)
    assert rates.tolist() == [0.4, 0.4, 0.3, 0.2] and not exact  # step 1 unknown: held from step 2
    with pytest.raises(TrajectoryError, match="no checkpoint-<step>/ folders"):
        trainer_trajectory(".")


def test_adamw_trainer_directory_gives_the_preconditioned_trajectory(tmp_path):
    """A Trainer run with AdamW (its default optimizer) and warm-up: the trajectory carries
    every checkpoint's optimizer.pt and the Trainer's param groups, and scores equal those of
    a trajectory built by hand from the second moments, named through the live optimizer."""
    from source_proj.trajectory.optimizer_state import optimizer_param_order

    trainer, model, data = train_with_trainer(tmp_path, 1, optim="adamw_torch", learning_rate=0.01, warmup_steps=2)
    with pytest.warns(UserWarning, match="decay differently"):
        got = trainer_trajectory(tmp_path, model=model)
    assert got.optimizer == "adamw" and got.betas == (0.9, 0.999) and got.eps == pytest.approx(1e-8)
    with pytest.raises(TrajectoryError, match="pass model="):
        trainer_trajectory(tmp_path)
    names = [n for group in optimizer_param_order(model, trainer.optimizer) for n in group]
    by_hand = []
    for c in got.checkpoints:
        saved = torch.load(f"{c.state}/optimizer.pt", weights_only=True)["state"]
        ids = sorted(saved)
        second_moments = {names[i]: saved[i]["exp_avg_sq"] for i in ids}
        by_hand.append(Checkpoint(c.state, c.steps, c.lr, optimizer_state=second_moments))
    hand = Trajectory(tuple(by_hand), optimizer="adamw", weight_decay=got.weight_decay)
    as_sgd = Trajectory(tuple(Checkpoint(c.state, c.steps, c.lr) for c in got.checkpoints), weight_decay=got.weight_decay)
    kw = dict(proj_dim=16, num_segments=3, progress=False)
    scores = SourceAttributor(model, "causal_lm", got, **kw).fit(data).score(data)
    torch.testing.assert_close(scores, SourceAttributor(model, "causal_lm", hand, **kw).fit(data).score(data))
    plain = SourceAttributor(model, "causal_lm", as_sgd, **kw).fit(data).score(data)
    assert (scores - plain).norm() > 0.5 * plain.norm()  # the preconditioner is really applied
