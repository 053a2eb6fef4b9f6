"""``torchrun ... source-proj fit/topk`` on 2 and 3 gloo processes against one process: the
same store bit for bit, resumption after a killed rank, one clear failure for a failing rank."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from source_proj.features.store import FeatureStore

TASK_FILE = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {tests!r})
    import torch
    from torch.utils.data import Dataset
    from tiny_models import blobs, trained_classifier
    from source_proj.cli.task_spec import TaskSpec

    class Rows(Dataset):
        # Training rows; with SLOW_ROWS set each row takes that many seconds to read.
        def __init__(self, x, y):
            self.x, self.y = x, y
        def __len__(self):
            return len(self.y)
        def __getitem__(self, i):
            time.sleep(float(os.environ.get("SLOW_ROWS", "0")))
            return self.x[i], self.y[i]

    def _spec(nan_row=None):
        if "PID_DIR" in os.environ:
            with open(os.path.join(os.environ["PID_DIR"], "rank" + os.environ.get("RANK", "0")), "w") as f:
                f.write(str(os.getpid()))
        model, trajectory, (x, y) = trained_classifier(n=96, epochs=3)
        if nan_row is not None:
            x = x.clone()
            x[nan_row, 0] = float("nan")
        return TaskSpec(model=model, task="classification", trajectory=trajectory, train=Rows(x, y),
                        queries=blobs(11, 4, 3, seed=9), config={{"num_segments": 2, "proj_dim": 16}})

    def task():
        return _spec()

    def task_with_nan():
        return _spec(nan_row=60)
    """
)
FIT = ["fit", "--chunk-rows", "8", "--batch-size", "8", "--keep-segments", "--query-mode", "final", "--quiet"]


@pytest.fixture(scope="module")
def task_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dist-task") / "dist_task.py"
    path.write_text(TASK_FILE.format(tests=str(Path(__file__).parent)))
    return path


def _command(world: int, *argv: str) -> list[str]:
    if world == 1:
        return [sys.executable, "-m", "source_proj.cli.main", *argv]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
            "-m", "source_proj.cli.main", *argv]


def _run(world: int, *argv: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    # One thread per process in every run: float32 BLAS results depend on the thread count.
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(_command(world, *argv), capture_output=True, text=True, env=full_env, timeout=timeout)


def _arrays(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(path, mode="r")
    return {name: np.asarray(array[...]) for name, array in group.arrays()}


def assert_same_store(a: Path, b: Path) -> None:
    first, second = _arrays(a), _arrays(b)
    assert sorted(first) == sorted(second)
    assert {"features", "segment_features", "self_influence", "curvature_eigenvectors"} <= set(first)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    meta_a, meta_b = FeatureStore.open(a), FeatureStore.open(b)
    assert meta_a.metadata == meta_b.metadata and meta_a.layout == meta_b.layout


def test_torchrun_fit_and_topk_equal_one_process(task_file, tmp_path):
    ref = _run(1, *FIT, "--task", f"{task_file}:task", "--store", str(tmp_path / "one.zarr"))
    assert ref.returncode == 0, ref.stderr
    top_ref = _run(1, "topk", "--task", f"{task_file}:task", "--store", str(tmp_path / "one.zarr"), "-k", "5")
    assert top_ref.returncode == 0, top_ref.stderr
    for world in (2, 3):
        store = tmp_path / f"world{world}.zarr"
        fit = _run(world, *FIT, "--task", f"{task_file}:task", "--store", str(store))
        assert fit.returncode == 0, fit.stderr
        assert fit.stderr.count("12 chunks computed now") == 1  # logged once, by rank 0
        assert_same_store(store, tmp_path / "one.zarr")
        top = _run(world, "topk", "--task", f"{task_file}:task", "--store", str(store), "-k", "5")
        assert top.returncode == 0, top.stderr
        assert top.stdout == top_ref.stdout  # written once, same ids and scores


def _written(path: Path) -> set[int]:
    return set(range(FeatureStore.open(path).layout.n_chunks)) - set(FeatureStore.open(path).pending_chunks())


def test_killed_rank_then_rerun_with_another_world_size(task_file, tmp_path):
    reference = tmp_path / "reference.zarr"
    assert _run(1, *FIT, "--task", f"{task_file}:task", "--store", str(reference)).returncode == 0
    store, pids = tmp_path / "killed.zarr", tmp_path / "pids"
    pids.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLOW_ROWS": "0.02", "PID_DIR": str(pids)}
    proc = subprocess.Popen(_command(2, *FIT, "--task", f"{task_file}:task", "--store", str(store)), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # kill rank 1 once a few chunks are written
            ledger_ready = (store / "zarr.json").is_file() and (pids / "rank1").is_file()
            if ledger_ready and len(_written(store)) >= 3:
                os.kill(int((pids / "rank1").read_text()), signal.SIGKILL)
                break
            time.sleep(0.05)
        else:
            pytest.fail("featurisation did not start in time")
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    done = _written(store)
    assert 3 <= len(done) < 12, err
    rerun = _run(3, *FIT, "--task", f"{task_file}:task", "--store", str(store))
    assert rerun.returncode == 0, rerun.stderr
    # Nothing complete was computed again: the rerun computed exactly the chunks left pending.
    assert f"{12 - len(done)} chunks computed now, {len(done)} found done" in rerun.stderr
    assert_same_store(store, reference)


def test_a_rank_that_fails_stops_the_run_with_its_message(task_file, tmp_path):
    started = time.monotonic()
    result = _run(2, *FIT, "--task", f"{task_file}:task_with_nan", "--store", str(tmp_path / "nan.zarr"), timeout=120)
    assert result.returncode != 0
    assert time.monotonic() - started < 100
    # Rows 48-95 (curvature chunks 6-11) are rank 1's share; row 60 holds the NaN.
    assert "failed on rank 1" in result.stderr and "NonFiniteError" in result.stderr
    assert "[60]" in result.stderr


def test_the_store_does_not_depend_on_the_thread_count(task_file, tmp_path):
    """One process with all cores' threads (torch's default; at least 2) and two processes with one
    thread each (what torchrun sets) write the same store array for array (k = 128: LAPACK's
    eigh differs between 1 and 2 threads at that size unless pinned)."""
    fit = [*FIT, "--proj-dim", "128", "--task", f"{task_file}:task"]
    one = tmp_path / "one.zarr"
    threads = str(max(2, os.cpu_count() or 1))
    assert _run(1, *fit, "--store", str(one), env={"OMP_NUM_THREADS": threads}).returncode == 0
    two = tmp_path / "two.zarr"
    result = _run(2, *fit, "--store", str(two), env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert_same_store(one, two)
