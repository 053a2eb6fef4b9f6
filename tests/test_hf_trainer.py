"""The trajectory of a real (tiny) Hugging Face Trainer run, read from its output directory."""

import json
import shutil
import warnings

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


def edit_states(folder, edit):
    """Apply ``edit`` to the trainer_state.json of every checkpoint folder in ``folder``."""
    for path in folder.glob("checkpoint-*/trainer_state.json"):
        state = json.loads(path.read_text())
        edit(state)
        path.write_text(json.dumps(state))


def test_sparse_logs_and_deleted_checkpoints_replay_or_interpolate(trainer_run, tmp_path):
    out, model, _ = trainer_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "checkpoint-2")  # as save_total_limit would
    edit_states(copy, lambda state: state.update(log_history=[e for e in state["log_history"] if e.get("step") in (1, 5)]))
    rates = [LR * (STEPS - (s - 1)) / STEPS for s in range(1, STEPS + 1)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = trainer_trajectory(copy, model=model)  # the schedule replayed from training_args.bin
    assert [str(w.message) for w in caught if "interpolated" in str(w.message)] == []
    assert [c.steps for c in got.checkpoints] == [4, 2]
    assert [r for c in got.checkpoints for r in c.lr] == pytest.approx(rates, rel=1e-12)
    for path in copy.glob("checkpoint-*/training_args.bin"):
        path.unlink()
    with pytest.warns(UserWarning, match="interpolated linearly"):
        got = trainer_trajectory(copy, model=model)
    assert [r for c in got.checkpoints for r in c.lr] == pytest.approx(rates, rel=1e-12)  # linear: exact


def test_logged_rates_are_placed_by_the_scheduler_states():
    # Trainer versions log the rate of the step (shift 0) or of the next one (shift 1):
    # scheduler.pt (rate after checkpoint step s) decides.
    used = [0.5, 0.4, 0.3, 0.2]
    logs_used = [{"step": s, "learning_rate": used[s - 1]} for s in range(1, 5)]
    logs_next = [{"step": s, "learning_rate": used[s]} for s in range(1, 4)]
    rates, exact = step_learning_rates(logs_used, {2: 0.3}, 4)
    assert exact.all() and rates.tolist() == used
    rates, exact = step_learning_rates(logs_next, {2: 0.3}, 4)
    assert rates.tolist() == [0.4, 0.4, 0.3, 0.2] and exact.tolist() == [False, True, True, True]  # step 1 held
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


def test_renamed_and_foreign_folders_are_refused_by_name(trainer_run, tmp_path):
    out, model, _ = trainer_run
    other = tmp_path / "other"
    train_with_trainer(other, 5, optim="sgd", learning_rate=LR)  # the same settings on other rows
    cases = {
        "renamed": (lambda run: (run / "checkpoint-6").rename(run / "checkpoint-5"),
                    r"checkpoint-5'.*global_step 6, but the folder is named checkpoint-5"),
        "duplicated": (lambda run: shutil.copytree(run / "checkpoint-4", run / "checkpoint-3"),
                       r"checkpoint-3'.*global_step 4"),
        "foreign": (lambda run: (shutil.rmtree(run / "checkpoint-4"), shutil.copytree(other / "checkpoint-4", run / "checkpoint-4")),
                    r"checkpoint-4': its trainer_state.json's log_history disagrees"),
    }
    for name, (damage, message) in cases.items():
        copy = tmp_path / name
        shutil.copytree(out, copy)
        damage(copy)
        with pytest.raises(TrajectoryError, match=message):
            trainer_trajectory(copy, model=model)


def test_logged_rates_that_contradict_the_schedule_are_refused(trainer_run, tmp_path):
    out, model, _ = trainer_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    tenfold = lambda state: [e.update(learning_rate=10 * e["learning_rate"]) for e in state["log_history"] if "learning_rate" in e]
    edit_states(copy, tenfold)
    # Logged rates are the rates of their steps (transformers 5): 10 x 0.3 logged at step 1.
    with pytest.raises(TrajectoryError, match=r"logs learning rate 3\.0 at step 1, but the linear schedule of .* gives 0\.3 "):
        trainer_trajectory(copy, model=model)
    for path in copy.glob("checkpoint-*/training_args.bin"):
        path.unlink()
    # No arguments to replay: scheduler.pt (the rate of step 3 after checkpoint-2: 0.2) contradicts the log (2.0).
    with pytest.raises(TrajectoryError, match=r"logs learning rate (2\.0|1\.9+8) at step 3, but the interpolation .* gives (0\.2|0\.19+8) for step 3"):
        trainer_trajectory(copy, model=model)


@pytest.mark.parametrize("name", ["scheduler.pt", "optimizer.pt", "training_args.bin", "trainer_state.json"])
def test_truncated_files_give_one_error_naming_them(trainer_run, tmp_path, name):
    out, model, _ = trainer_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    path = copy / f"checkpoint-{STEPS}" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(TrajectoryError, match=rf"cannot read .*checkpoint-{STEPS}/{name}'"):
        trainer_trajectory(copy, model=model)


def test_the_reduction_read_from_the_run_is_the_trainers_loss(trainer_run, tmp_path):
    """The Trainer's own compute_loss on a batch of equal-length rows, as its training step calls
    it (num_items_in_batch = the batch's target tokens), is the mean over rows of the task's
    per-row loss under the reduction read from the run; the summed loss is not."""
    from transformers import Trainer, TrainingArguments

    from source_proj.gradients.causal_lm import CausalLMTask
    from source_proj.gradients.task_names import resolve_task
    from source_proj.trajectory.hf_trainer import trainer_loss_reduction

    out, model, data = trainer_run
    with pytest.warns(UserWarning, match="no source_record.json with the run's token counts.*'mean' assumed"):
        reduction = trainer_loss_reduction(out)  # equal-length rows: 'mean' is exact
    batch = {k: torch.tensor(data[:4][k]) for k in ("input_ids", "labels")}
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))
    with torch.no_grad():
        trainers = trainer.compute_loss(model, batch, num_items_in_batch=(batch["labels"][:, 1:] != -100).sum())
        logits = model(input_ids=batch["input_ids"]).logits.double()
    ours = CausalLMTask(reduction=reduction).loss(logits, batch["labels"]).mean()
    assert float(ours) == pytest.approx(float(trainers), rel=1e-5)
    summed = CausalLMTask(reduction="sum").loss(logits, batch["labels"]).mean()
    assert float(summed) > 5 * float(trainers)
    # Where the reduction is not given, the Trainer's is assumed, with a warning that says so.
    with pytest.warns(UserWarning, match="reduction not given, assuming 'mean'"):
        assert resolve_task("causal_lm").reduction == reduction
    copy = tmp_path / "classifier"
    shutil.copytree(out, copy)
    config = copy / "checkpoint-6" / "config.json"
    config.write_text(config.read_text().replace("GPT2LMHeadModel", "GPT2ForSequenceClassification"))
    with pytest.raises(TrajectoryError, match="not a Hugging Face causal LM"):
        trainer_loss_reduction(copy)


def test_training_args_are_read_without_running_pickled_code(tmp_path):
    """training_args.bin is a pickle: one that would run code when loaded is not run (its
    stand-in holds no schedule: a TrajectoryError naming the file)."""
    from source_proj.trajectory.hf_trainer import schedule_args

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').close()",)

    torch.save(Payload(), tmp_path / "training_args.bin")
    with pytest.raises(TrajectoryError, match=r"cannot read the learning-rate schedule from .*training_args.bin"):
        schedule_args(tmp_path)
    assert not marker.exists()


def test_warmup_steps_are_counted_as_transformers_counts_them():
    from transformers import TrainingArguments

    from source_proj.trajectory.hf_trainer import ScheduleArgs

    for warmup in (0, 0.25, 0.3, 4):  # transformers 5: a count, or a fraction of the total when < 1
        own = ScheduleArgs("linear", 0.1, warmup, 0.0, {}).warmup(10)
        assert own == TrainingArguments(output_dir="unused", warmup_steps=warmup).get_warmup_steps(10)
    # transformers 4: warmup_steps 0 and warmup_ratio 0.25 of 10 steps: ceil(2.5) = 3.
    assert ScheduleArgs("linear", 0.1, 0, 0.25, {}).warmup(10) == 3
