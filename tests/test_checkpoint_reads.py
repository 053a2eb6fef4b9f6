"""Each reading pass (a fit, in memory or into a store; a set of queries) reads every checkpoint
file and every optimizer-state file at most once, however many chunks of rows it computes
(issue #27: 13 loads for 6 files per command before), and gives the same features as states
read afresh for every chunk."""

from __future__ import annotations

import dataclasses
import textwrap
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from tiny_models import blobs, mlp

import source_proj.trajectory.checkpoints as checkpoints_module
import source_proj.trajectory.optimizer_state as optimizer_module
from source_proj.attributor import SourceAttributor
from source_proj.cli.main import main
from source_proj.evaluation.training import AdamWSettings, train_adamw
from source_proj.gradients.tasks import ClassificationTask
from source_proj.trajectory.checkpoints import Trajectory

# 24 rows in chunks of 8 (3 chunks per pass; store chunks of 8 rows: 3 store chunks).
SETTINGS = dict(proj_dim=8, num_segments=2, query_mode="segment", chunk_size=8, progress=False)
TASK_FILE = textwrap.dedent(
    """
    import sys
    import torch
    sys.path.insert(0, {tests!r})
    from tiny_models import blobs, mlp
    from source_proj.cli.task_spec import TaskSpec

    def task():
        return TaskSpec(model=mlp((4, 6, 3), 0), task="classification",
                        trajectory=torch.load({trajectory!r}, weights_only=False), train=blobs(24, 4, 3, seed=0),
                        queries=blobs(9, 4, 3, seed=9), config={settings!r})
    """
)


class Reads:
    """File reads of checkpoint states and optimizer states (by file name), per outermost
    ``reading_pass`` and outside any."""

    def __init__(self) -> None:
        self.passes: list[Counter] = []
        self.outside: Counter = Counter()
        self.current: Counter | None = None

    def record(self, source: object) -> None:
        if not isinstance(source, dict):
            (self.outside if self.current is None else self.current)[Path(source).name] += 1

    def clear(self) -> None:
        self.passes, self.outside = [], Counter()


@pytest.fixture
def reads(monkeypatch) -> Reads:
    found = Reads()
    load_state, load_optimizer = checkpoints_module.load_state_file, optimizer_module.load_optimizer_state
    reading_pass = SourceAttributor.reading_pass

    def counted_state(path):
        found.record(path)
        return load_state(path)

    def counted_optimizer(source, where):
        found.record(source)
        return load_optimizer(source, where)

    @contextmanager
    def counted_pass(self) -> Iterator[None]:
        outermost = found.current is None
        if outermost:
            found.current = Counter()
            found.passes.append(found.current)
        try:
            with reading_pass(self):
                yield
        finally:
            if outermost:
                found.current = None

    monkeypatch.setattr(checkpoints_module, "load_state_file", counted_state)
    monkeypatch.setattr(optimizer_module, "load_optimizer_state", counted_optimizer)
    monkeypatch.setattr(SourceAttributor, "reading_pass", counted_pass)
    return found


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Trajectory, Path, tuple[torch.Tensor, torch.Tensor]]:
    """An AdamW run whose checkpoints and optimizer states are files (6 of each)."""
    folder = tmp_path_factory.mktemp("run")
    x, y = blobs(24, 4, 3, seed=0)
    settings = AdamWSettings(epochs=6, batch_size=8, lr=0.02, weight_decay=0.05, warmup_fraction=0.2)
    trajectory = settings.trajectory(train_adamw(mlp((4, 6, 3), 0), ClassificationTask(), x, y, settings,
                                                 checkpoint_dir=folder))
    return trajectory, folder, (x, y)


def _files(trajectory: Trajectory) -> set[str]:
    return {Path(p).name for c in trajectory.checkpoints for p in (c.state, c.optimizer_state)}


def _in_memory(trajectory: Trajectory) -> Trajectory:
    """The same run with every state loaded up front (nothing read from files during a pass)."""
    loaded = [
        dataclasses.replace(c, state=torch.load(c.state), optimizer_state=torch.load(c.optimizer_state))
        for c in trajectory.checkpoints
    ]
    return dataclasses.replace(trajectory, checkpoints=tuple(loaded))


def test_a_fit_and_queries_read_each_file_once_per_pass(run, reads):
    trajectory, _, (x, y) = run
    queries = blobs(20, 4, 3, seed=5)
    attributor = SourceAttributor(mlp((4, 6, 3), 0), "classification", trajectory, **SETTINGS)
    assert reads.outside == Counter({name: 1 for name in _files(trajectory)})  # the checks made on construction
    reads.clear()
    attributor.fit((x, y))
    q = attributor.query_features(queries)
    assert reads.outside == Counter()
    assert len(reads.passes) == 2  # the fit (data check, curvature, 3 chunks of rows) and the queries (3 chunks)
    for found in reads.passes:  # every file read, once
        assert found == Counter({name: 1 for name in _files(trajectory)})

    # The oracle: states loaded up front, so that every chunk uses them afresh.
    reference = SourceAttributor(mlp((4, 6, 3), 0), "classification", _in_memory(trajectory), **SETTINGS).fit((x, y))
    torch.testing.assert_close(attributor.train_features, reference.train_features, rtol=0, atol=0)
    torch.testing.assert_close(q, reference.query_features(queries), rtol=0, atol=0)


def test_a_store_fit_reads_each_file_once(run, reads, tmp_path):
    trajectory, _, (x, y) = run
    attributor = SourceAttributor(mlp((4, 6, 3), 0), "classification", trajectory, **SETTINGS)
    reads.clear()
    attributor.fit((x, y), store=tmp_path / "s.zarr", chunk_rows=8)  # 3 store chunks
    assert reads.outside == Counter()
    assert reads.passes == [Counter({name: 1 for name in _files(trajectory)})]
    reference = SourceAttributor(mlp((4, 6, 3), 0), "classification", _in_memory(trajectory), **SETTINGS).fit((x, y))
    torch.testing.assert_close(torch.from_numpy(attributor.features.read_rows(0, 24)), reference.train_features,
                               rtol=0, atol=0)


def test_cli_fit_then_topk_read_each_file_once_per_pass(run, reads, tmp_path, capsys):
    trajectory, _, _ = run
    saved = tmp_path / "trajectory.pt"
    torch.save(trajectory, saved)
    task = tmp_path / "task.py"
    settings = {k: v for k, v in SETTINGS.items() if k != "progress"}
    task.write_text(TASK_FILE.format(tests=str(Path(__file__).parent), trajectory=str(saved), settings=settings))
    files, final = _files(trajectory), Path(trajectory.checkpoints[-1].state).name
    store = str(tmp_path / "s.zarr")

    assert main(["fit", "--task", f"{task}:task", "--store", store, "--chunk-rows", "8", "--quiet"]) == 0
    assert reads.outside == Counter({name: 1 for name in files})  # on construction
    assert reads.passes == [Counter({name: 1 for name in files})]

    reads.clear()
    assert main(["topk", "--task", f"{task}:task", "--store", store, "-k", "3", "--quiet"]) == 0, capsys.readouterr().err
    # On construction, and the final checkpoint once more: the model runs on the training
    # data's first row to check that it is the data the store holds.
    assert reads.outside == Counter({name: 1 for name in files}) + Counter({final: 1})
    assert reads.passes == [Counter({name: 1 for name in files})]  # the queries
