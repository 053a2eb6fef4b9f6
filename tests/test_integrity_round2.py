"""Integrity round 2: each fault reproduced, and the clear error (or right result) it must
now give. 4: a custom task's loss changed between an interrupted fit and its resume;
5: query rows the task cannot use; 9b: a ``chunk_rows`` whose buffers cannot fit in memory."""

from __future__ import annotations

import functools
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import trained_classifier
from torch import nn

import source_proj.store_fit as fit_module
from source_proj.attributor import SourceAttributor
from source_proj.cli.task_spec import load_task
from source_proj.errors import InputError
from source_proj.features.errors import StoreMismatchError
from source_proj.features.layout import StoreLayout
from source_proj.features.store import FeatureStore
from source_proj.gradients.causal_lm import CausalLMTask
from source_proj.gradients.memory import MemoryBudgetError
from source_proj.gradients.tasks import ClassificationTask, RegressionTask, Task
from source_proj.store_fit import fit_store

CHUNK = 16  # 60 training rows -> 4 store chunks


@pytest.fixture(scope="module")
def run():
    """A small trained classifier: model, trajectory, 60 training rows (3 classes)."""
    return trained_classifier(n=60, epochs=2)


def _attributor(model, trajectory, task="classification") -> SourceAttributor:
    return SourceAttributor(model, task, trajectory, proj_dim=8, num_segments=2, chunk_size=8, progress=False)


def _no_curvature(monkeypatch, attributor: SourceAttributor) -> None:
    monkeypatch.setattr(attributor, "checkpoint_hessian", lambda *a: pytest.fail("curvature pass started"))


def _margin(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    own = outputs.gather(1, targets[:, None])[:, 0]
    return own - torch.logsumexp(outputs, dim=1)


# ------------------------------------------------------- 4. a custom task's loss, fingerprinted
def _closure_task(smoothing: float) -> Task:
    def loss(outputs, targets):
        return F.cross_entropy(outputs, targets, reduction="none", label_smoothing=smoothing)

    return Task(loss=loss, measurement=_margin)


def _default_argument_task(smoothing: float) -> Task:
    def loss(outputs, targets, smoothing=smoothing):
        return F.cross_entropy(outputs, targets, reduction="none", label_smoothing=smoothing)

    return Task(loss=loss, measurement=_margin)


def _module_task(smoothing: float) -> Task:
    return Task(loss=nn.CrossEntropyLoss(reduction="none", label_smoothing=smoothing), measurement=_margin)


def _partial_task(smoothing: float) -> Task:
    return Task(loss=functools.partial(F.cross_entropy, reduction="none", label_smoothing=smoothing), measurement=_margin)


FORMS = {"closure": _closure_task, "default": _default_argument_task, "module": _module_task, "partial": _partial_task}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_fingerprint_follows_the_loss_whatever_holds_its_setting(form):
    build = FORMS[form]
    outputs, targets = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 1, 0])
    plain, rebuilt, smoothed = build(0.0), build(0.0), build(0.3)
    # Oracle: the losses themselves (label smoothing changes them, a rebuilt task does not).
    assert not torch.allclose(plain.loss(outputs, targets), smoothed.loss(outputs, targets), atol=1e-3)
    torch.testing.assert_close(plain.loss(outputs, targets), rebuilt.loss(outputs, targets), rtol=0, atol=0)
    assert plain.fingerprint() == rebuilt.fingerprint() != smoothed.fingerprint()
    assert re.fullmatch(r"[0-9a-f]{64}", plain.fingerprint())
    # The query measurement does not enter the stored features, so it is left out.
    other_query = Task(loss=plain.loss, measurement=lambda o, t: o.sum(dim=1))
    assert other_query.fingerprint() == Task(loss=plain.loss, measurement=_margin).fingerprint()


def test_built_in_tasks_record_no_fingerprint_but_a_replaced_loss_does():
    # Built-in tasks are described by their name, so stores made before fingerprints still open.
    assert ClassificationTask().fingerprint() is None
    assert RegressionTask().fingerprint() is None
    assert CausalLMTask(reduction="mean").fingerprint() is None
    # A library function chosen as the loss is the user's choice: it is recorded, and changes.
    swapped = ClassificationTask(loss=_closure_task(0.3).loss)
    assert swapped.fingerprint() is not None
    mse = Task(loss=lambda o, t: F.mse_loss(o, F.one_hot(t, 3).float(), reduction="none").sum(1), measurement=_margin)
    assert Task(loss=F.cross_entropy, measurement=_margin).fingerprint() not in (None, mse.fingerprint())


def test_changed_custom_loss_is_refused_on_resume_and_the_same_task_rebuilt_resumes(run, tmp_path, monkeypatch):
    model, trajectory, train = run
    path = tmp_path / "custom.zarr"
    broken = _attributor(model, trajectory, _closure_task(0.0))
    original, calls = broken.featurize_rows, {"n": 0}

    def dying(examples, start, stop):
        calls["n"] += 1
        if calls["n"] > 2:  # after chunk 0 (two batches of 8 rows)
            raise KeyboardInterrupt
        return original(examples, start, stop)

    monkeypatch.setattr(broken, "featurize_rows", dying)
    with pytest.raises(KeyboardInterrupt):
        fit_store(broken, train, path, chunk_rows=CHUNK)
    assert FeatureStore.open(path).pending_chunks() == [1, 2, 3]

    changed = _attributor(model, trajectory, _closure_task(0.3))
    _no_curvature(monkeypatch, changed)
    with pytest.raises(StoreMismatchError, match=r"metadata\.task_fingerprint") as caught:
        fit_store(changed, train, path, chunk_rows=CHUNK)
    assert caught.value.field == "metadata.task_fingerprint"
    assert FeatureStore.open(path).pending_chunks() == [1, 2, 3]  # nothing written

    resumed, report = fit_store(_attributor(model, trajectory, _closure_task(0.0)), train, path, chunk_rows=CHUNK)
    assert report.computed_chunks == (1, 2, 3)
    # Oracle: an uninterrupted fit with the original loss.
    whole, _ = fit_store(_attributor(model, trajectory, _closure_task(0.0)), train, tmp_path / "whole.zarr", chunk_rows=CHUNK)
    np.testing.assert_allclose(resumed.read_rows(0, 60), whole.read_rows(0, 60), rtol=1e-5, atol=1e-7)


TASK_FILE = """
import torch
import torch.nn.functional as F
from torch import nn
from source_proj.cli.task_spec import TaskSpec
from source_proj.gradients.tasks import Task
from source_proj.trajectory.checkpoints import Checkpoint, Trajectory

SMOOTHING = {smoothing}

def loss(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none", label_smoothing=SMOOTHING){edit}

def task():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    trajectory = Trajectory((Checkpoint(model.state_dict(), steps=1, lr=0.1),))
    x, y = torch.randn(8, 4), torch.arange(8) % 3
    return TaskSpec(model=model, task=Task(loss=loss, measurement=lambda o, t: o.sum(dim=1)),
                    trajectory=trajectory, train=(x, y), config={{"proj_dim": 8, "num_segments": 1}})
"""


def test_task_file_fingerprint_is_the_same_in_a_new_process_and_changes_with_an_edit(tmp_path):
    path = tmp_path / "smooth_task.py"

    def fingerprint(smoothing: str = "0.0", edit: str = "") -> str:
        path.write_text(TASK_FILE.format(smoothing=smoothing, edit=edit))
        return load_task(f"{path}:task").task.fingerprint()

    first = fingerprint()
    load = f"from source_proj.cli.task_spec import load_task; print(load_task({f'{path}:task'!r}).task.fingerprint())"
    again = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, check=True).stdout.strip()
    assert again == first  # the CLI loads the task file anew in every run
    assert fingerprint() == first
    assert fingerprint(smoothing="0.3") != first  # a global constant the loss reads
    assert fingerprint(edit=" * 2.0") != first  # the loss's code
    assert fingerprint() == first


def test_cli_fit_and_verify_refuse_a_store_made_with_another_loss(tmp_path, capsys):
    from source_proj.cli.main import main

    path, store = tmp_path / "cli_task.py", tmp_path / "feats.zarr"

    def cli(*argv: str, smoothing: str = "0.0") -> tuple[int, str]:
        path.write_text(TASK_FILE.format(smoothing=smoothing, edit=""))
        code = main([*argv, "--task", f"{path}:task", "--store", str(store), "--quiet"])
        return code, capsys.readouterr().err

    code, err = cli("fit", "--chunk-rows", "4")
    assert code == 0 and "2 chunks computed now" in err, err
    code, err = cli("fit", "--chunk-rows", "4", smoothing="0.3")
    assert code == 2 and "metadata.task_fingerprint" in err and len(err.strip().splitlines()) == 1, err
    code, err = cli("verify", smoothing="0.3")
    assert code == 1 and "problem: " in err and "metadata.task_fingerprint" in err, err
    code, err = cli("verify")  # the same task file, loaded anew
    assert code == 0 and "no problem found" in err, err


# ------------------------------------------------------------------------- 5. query rows
@pytest.fixture(scope="module")
def fitted(run):
    model, trajectory, train = run
    return _attributor(model, trajectory).fit(train), train


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x, y: (x, y.float() + 0.5), r"^queries: classification labels must be integer class indices, got dtype "
                                            r"torch.float32 \(rows 0-5, first values \[\d\.5, "),
        (lambda x, y: (x, torch.where(torch.arange(6) == 4, 3, y)), r"^queries: .* rows \[4\] \(values \[3\]\) are outside \[0, 3\)"),
        (lambda x, y: (x, torch.where(torch.arange(6) == 2, -100, y)), r"^queries: .* rows \[2\] \(values \[-100\]\) are -100"),
        (lambda x, y: (x[:, :3], y), r"^queries: the model cannot run on row 0, inputs of shape \(3,\) per row"),
    ],
    ids=["float", "out-of-range", "ignore-index", "input-width"],
)
def test_bad_query_rows_are_refused_naming_the_row_and_value(fitted, change, message):
    attributor, (x, y) = fitted
    queries = change(x[:6].clone(), y[:6].clone())
    for ask in (attributor.score, attributor.query_features):
        with pytest.raises(InputError, match=message):
            ask(queries)
    # Oracle for the valid rows: the score is the query features against the training features.
    good = (x[:6], y[:6])
    torch.testing.assert_close(attributor.score(good), attributor.query_features(good) @ attributor.train_features.T)


def test_causal_lm_queries_may_ignore_tokens_but_must_keep_one():
    task = CausalLMTask(reduction="sum")
    # -100 at some positions is fine: it is the ignore index for tokens (as for training rows).
    task.check_targets(torch.tensor([[5, -100, 2, 7], [1, 2, -100, -100]]), 4 * 10)
    with pytest.raises(InputError, match=r"rows \[4\] have no target token"):
        task.check_targets(torch.tensor([[3, -100, -100, -100]]), 4 * 10, first_row=4)  # the first label is shifted off
    with pytest.raises(InputError, match=r"rows \[1\] hold negative token ids \[-5\]"):
        task.check_targets(torch.tensor([[3, 1, 2], [3, -5, 2]]), 3 * 10)
    with pytest.raises(InputError, match="integer token ids, got dtype torch.float32"):
        task.check_targets(torch.tensor([[3.0, 1.0, 2.0]]), 3 * 10)


# ----------------------------------------------------------------- 9b. chunk_rows vs memory
def test_huge_chunk_rows_is_refused_before_any_work_with_a_value_that_fits(run, tmp_path, monkeypatch):
    model, trajectory, train = run
    attributor = _attributor(model, trajectory)
    _no_curvature(monkeypatch, attributor)
    monkeypatch.setattr(attributor, "check_training_data", lambda *a, **k: pytest.fail("data pass started"))
    path = tmp_path / "huge.zarr"
    with pytest.raises(MemoryBudgetError, match=r"chunk_rows=1,000,000,000 \(--chunk-rows\)") as caught:
        fit_store(attributor, train, path, chunk_rows=10**9)
    assert not path.exists()
    assert len(str(caught.value).splitlines()) == 1
    suggested = int(re.search(r"use chunk_rows=(\d+)", str(caught.value)).group(1))
    assert suggested == 60  # all 60 rows fit in one chunk on any machine that runs these tests
    store, report = fit_store(_attributor(model, trajectory), train, path, chunk_rows=suggested)
    assert report.computed_chunks == (0,) and store.is_complete


def test_chunk_memory_limit_is_the_documented_buffer_count():
    # Hand count for a float32 store of D = 16 with self-influence: a computed row is 16 x 4 + 8
    # = 72 bytes, a stored row 72 bytes too; two chunks of n rows computed and 2 x chunk_rows
    # buffered: 2 (72 n + 2 x 72 chunk_rows) = 432 chunk_rows bytes for chunk_rows <= N.
    layout = lambda rows: StoreLayout(n_rows=1000, dim=16, chunk_rows=rows, self_influence=True)  # noqa: E731
    available = 2 * 432 * 50  # the buffers may take half
    fit_module.check_chunk_memory(layout(50), available)
    with pytest.raises(MemoryBudgetError, match=r"use chunk_rows=50 \(--chunk-rows 50\) or fewer"):
        fit_module.check_chunk_memory(layout(51), available)
    # Past N, only the stored buffers grow (zarr pads the last chunk to its full size):
    # 2 (72 x 1000 + 2 x 72 chunk_rows) <= 432 x 1500 holds up to chunk_rows = 1750; N = 1000 is
    # the value suggested (more rows than N gain nothing).
    fit_module.check_chunk_memory(layout(1750), 2 * 432 * 1500)
    with pytest.raises(MemoryBudgetError, match=r"use chunk_rows=1000 "):
        fit_module.check_chunk_memory(layout(1751), 2 * 432 * 1500)
