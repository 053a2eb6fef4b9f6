"""A Trainer run's learning rates read exactly: the schedule replayed from training_args.bin and
the SourceRecordCallback record, each against the rates the real optimizer used at every step
(a step pre-hook on the torch optimizer inside the Trainer), with logging_steps larger than the
run; edited arguments refused."""

import shutil
import warnings

import pytest
import torch
from lm_helpers import padded_batch, random_rows, tiny_gpt2

from source_proj.trajectory.checkpoints import TrajectoryError
from source_proj.trajectory.hf_trainer import (
    RECORD_FILE,
    read_trainer_record,
    trainer_loss_reduction,
    trainer_param_order,
    trainer_trajectory,
)
from source_proj.trajectory.trainer_callback import SourceRecordCallback

pytest.importorskip("transformers")
STEPS, SAVE, WARMUP, LR = 6, 2, 3, 0.05
SCHEDULES = ("linear", "cosine", "constant_with_warmup")


def trained(out, schedule: str, exempt_lr: float | None = None, rows: list[dict] | None = None, resume: int = 0):
    """A tiny GPT-2 trained by transformers.Trainer (SGD, ``schedule`` with WARMUP warm-up
    steps, logging_steps 500 > STEPS) with SourceRecordCallback(stage="pre") and a step
    pre-hook on the real torch optimizer; with ``exempt_lr``, an SGD of the Trainer's two
    param groups, the second (biases, LayerNorm weights) at that base rate; ``rows``: the
    training rows (default 12 of 6 tokens), right-padded with label -100; ``resume``: resume from
    ``out/checkpoint-<resume>``. Returns (model, the per-group rates of every step it took)."""
    import datasets
    from transformers import Trainer, TrainerCallback, TrainingArguments

    used = []

    class OptimizerRates(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            torch_optimizer = getattr(optimizer, "optimizer", optimizer)  # inside accelerate's wrapper
            torch_optimizer.register_step_pre_hook(
                lambda opt, *_: used.append(tuple(g["lr"] for g in opt.param_groups)))

    padded = padded_batch(rows or random_rows(12, 10, (6, 6), seed=4, masked=False), 0, junk_label=-100)
    data = datasets.Dataset.from_dict({k: v.tolist() for k, v in padded.items()})
    model = tiny_gpt2()
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, max_steps=STEPS, save_steps=SAVE, logging_steps=500,
        learning_rate=LR, optim="sgd", weight_decay=0.0, lr_scheduler_type=schedule, warmup_steps=WARMUP,
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    optimizer = None
    if exempt_lr is not None:
        named = dict(model.named_parameters())
        optimizer = torch.optim.SGD([{"params": [named[n] for n in names], "lr": lr}
                                     for names, lr in zip(trainer_param_order(model), (LR, exempt_lr))])
    callbacks = [SourceRecordCallback(stage="pre"), OptimizerRates()]
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks, optimizers=(optimizer, None))
    trainer.train(resume_from_checkpoint=str(out / f"checkpoint-{resume}") if resume else None)
    assert len(used) == STEPS - resume and len(set(used)) > 2  # a real schedule, one entry per optimizer step
    return model, used


@pytest.fixture(scope="module", params=SCHEDULES)
def run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    return (out, *trained(out, request.param))


def lrs(trajectory):
    return [r for c in trajectory.checkpoints for r in c.lr]


def test_record_and_replay_equal_the_optimizers_rates(run, tmp_path):
    out, model, used = run
    # The callback's record holds every group's rate of every step, and the stage.
    record = read_trainer_record(out / f"checkpoint-{STEPS}")
    assert record.learning_rates == tuple(used) and record.stage == "pre" and record.complete
    assert len(record.batch_digests) == STEPS and None not in record.batch_digests
    assert read_trainer_record(out / "checkpoint-2").precedes(record)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trainer_loss_reduction(out) == "mean"  # every row has 5 target tokens
    got = trainer_trajectory(out, model=model)
    assert lrs(got) == [u[0] for u in used] and {c.stage for c in got.checkpoints} == {"pre"}
    # Without the record: the schedule replayed from training_args.bin, no warning needed.
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    shutil.copy(copy / "checkpoint-2" / RECORD_FILE, copy / "checkpoint-4" / RECORD_FILE)
    with pytest.raises(TrajectoryError, match=rf"checkpoint-4/{RECORD_FILE}' records step 2, not the folder's 4"):
        trainer_trajectory(copy, model=model)
    for record_file in copy.glob(f"checkpoint-*/{RECORD_FILE}"):
        record_file.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        replayed = trainer_trajectory(copy, model=model)
    assert lrs(replayed) == pytest.approx([u[0] for u in used], rel=1e-12, abs=0)
    # Without the arguments either: only the scheduler.pt rates (of steps 3 and 5) are known, and
    # the warning says that the warm-up steps 1..2 are not.
    for args_file in copy.glob("checkpoint-*/training_args.bin"):
        args_file.unlink()
    with pytest.warns(UserWarning, match=r"2 of 6 steps are exact.*steps 1\.\.2 before the first known one"):
        fallback = trainer_trajectory(copy, model=model)
    assert lrs(fallback)[2] == pytest.approx(used[2][0], rel=1e-12) and lrs(fallback)[0] != used[0][0]



def test_edited_warmup_in_training_args_is_refused(run, tmp_path):
    out, model, _ = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    for record_file in copy.glob(f"checkpoint-*/{RECORD_FILE}"):
        record_file.unlink()

    def edit(folder):
        path = folder / "training_args.bin"
        args = torch.load(path, weights_only=False)
        args.warmup_steps = WARMUP - 1
        torch.save(args, path)

    edit(copy / "checkpoint-4")  # one folder's arguments differ from the others': named
    with pytest.raises(TrajectoryError, match=r"checkpoint-4'.*training_args.bin schedule disagrees"):
        trainer_trajectory(copy, model=model)
    for folder in (copy / "checkpoint-2", copy / f"checkpoint-{STEPS}"):
        edit(folder)
    # All agree, but not with the run: the scheduler.pt of checkpoint-2 holds the rate of step 3.
    with pytest.raises(TrajectoryError, match=r"checkpoint-2/scheduler.pt'.*learning rate of step 3 \(param group 0\)"):
        trainer_trajectory(copy, model=model)


def test_param_groups_with_their_own_rates(tmp_path):
    """Groups of different base rates: the record holds each group's rates, the replay (checked
    against every group's rate in scheduler.pt) agrees, and a warning notes that the trajectory
    takes group 0's."""
    model, used = trained(tmp_path, "cosine", exempt_lr=LR / 10)
    assert read_trainer_record(tmp_path / f"checkpoint-{STEPS}").learning_rates == tuple(used)
    for record_file in tmp_path.glob(f"checkpoint-*/{RECORD_FILE}"):
        record_file.unlink()
    with pytest.warns(UserWarning, match=r"param groups' learning rates differ \(step 2: \[0\.01666.*, 0\.001666"):
        got = trainer_trajectory(tmp_path, model=model)
    assert lrs(got) == pytest.approx([u[0] for u in used], rel=1e-12, abs=0)
    assert [u[1] for u in used] == pytest.approx([u[0] / 10 for u in used], rel=1e-12)


def test_the_record_gives_the_reduction_of_rows_of_varied_lengths(tmp_path):
    """Rows of 3..8 tokens, some with a masked prompt, padded: the Trainer's batch token mean is,
    per row, the row's summed loss over the run's mean target count, counted here by hand over
    the rows (the run is two epochs: every row twice)."""
    rows = random_rows(12, 10, (3, 8), seed=6, masked=True)
    model, _ = trained(tmp_path, "linear", rows=rows)
    targets = [sum(label != -100 for label in r["labels"][1:]) for r in rows]
    assert len(set(targets)) > 1
    assert trainer_loss_reduction(tmp_path) == pytest.approx(sum(targets) / len(rows), rel=1e-15)


@pytest.mark.parametrize("run", ["cosine"], indirect=True)
def test_a_resumed_run_continues_the_record(run, tmp_path):
    """Resumed from checkpoint-2, the Trainer replays the same steps: the record continues the
    checkpoint's and equals the uninterrupted run's, rates, batch digests and counts alike."""
    out, _, used = run
    shutil.copytree(out / "checkpoint-2", tmp_path / "checkpoint-2")
    _, resumed_used = trained(tmp_path, "cosine", resume=2)
    assert resumed_used == used[2:]
    assert read_trainer_record(tmp_path / f"checkpoint-{STEPS}") == read_trainer_record(out / f"checkpoint-{STEPS}")
