"""No silent wrong results: each fault of issue 9 reproduced, and the clear error (or the
correct result) it must now give. Store-level faults use a tiny fitted classifier; the
oracle is always an uninterrupted, undamaged run (or exact search)."""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from store_helpers import METADATA, chunk_with_extras
from tiny_models import trained_classifier
from torch import nn

from source_proj.attributor import SourceAttributor
from source_proj.features.errors import DataMismatchError, StoreCorruptError, StoreError, StoreMismatchError
from source_proj.features.featurize import featurize
from source_proj.features.layout import StoreLayout
from source_proj.features.lock import (
    StoreLock,
    StoreLockedError,
    check_holder,
    hold_lock,
    lock_path,
    read_holder,
)
from source_proj.features.store import FeatureStore
from source_proj.gradients.model import ModelFunction
from source_proj.gradients.per_example import NonFiniteError
from source_proj.gradients.tasks import Task
from source_proj.retrieval.exact import exact_proponents_opponents, exact_topk
from source_proj.retrieval.ivf import IVFSettings, build_ivf, recall_at_k
from source_proj.store_fit import check_training_data, fit_store, open_store

CHUNK = 16  # rows per store chunk: 60 training rows -> 4 chunks, the last one partial


@pytest.fixture(scope="module")
def run():
    """A small trained classifier: model, trajectory, 60 training rows (3 classes)."""
    return trained_classifier(n=60, epochs=2)


def _attributor(model, trajectory, **settings) -> SourceAttributor:
    config = {"proj_dim": 8, "num_segments": 2, "chunk_size": 8, "progress": False, **settings}
    return SourceAttributor(model, "classification", trajectory, **config)


def _no_curvature(monkeypatch, attributor: SourceAttributor) -> None:
    monkeypatch.setattr(attributor, "checkpoint_hessian", lambda *a: pytest.fail("curvature pass started"))


def _fitted(run, path: Path, **kwargs):
    model, trajectory, train = run
    return fit_store(_attributor(model, trajectory), train, path, chunk_rows=CHUNK, **kwargs)[0]


# ------------------------------------------------------------------ 1. changed training data
def test_changed_training_data_is_refused_naming_the_first_differing_chunk(run, tmp_path, monkeypatch):
    model, trajectory, (x, y) = run
    path = tmp_path / "s.zarr"
    _fitted(run, path)
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(0))
    relabelled = y.clone()
    flip = torch.randperm(60, generator=torch.Generator().manual_seed(1))[:18] + 0  # 30% of the rows
    relabelled[flip] = (relabelled[flip] + 1) % 3
    for data, first in (((x[perm], y[perm]), int((perm != torch.arange(60)).nonzero()[0]) // CHUNK),
                        ((x, relabelled), int(flip.min()) // CHUNK)):
        attributor = _attributor(model, trajectory)
        _no_curvature(monkeypatch, attributor)
        with pytest.raises(DataMismatchError, match=f"chunk {first} ") as info:
            fit_store(attributor, data, path, chunk_rows=CHUNK)
        assert info.value.chunk == first and info.value.rows == (first * CHUNK, min(60, first * CHUNK + CHUNK))
        with pytest.raises(DataMismatchError):  # the full check a reader can run
            check_training_data(_attributor(model, trajectory), FeatureStore.open(path), data)
    check_training_data(_attributor(model, trajectory), FeatureStore.open(path), (x, y))
    with pytest.raises(StoreMismatchError, match="layout.n_rows"):
        check_training_data(_attributor(model, trajectory), FeatureStore.open(path), (x[:59], y[:59]))

    # A half-done store resumed with data changed only in its pending rows is refused too:
    # the curvature and the chunks written were computed from the old rows.
    broken = _attributor(model, trajectory)
    original = broken.featurize_rows
    calls = {"n": 0}

    def dying(examples, start, stop):
        calls["n"] += 1
        if calls["n"] > 2:  # after chunk 0 (two batches of 8)
            raise KeyboardInterrupt
        return original(examples, start, stop)

    monkeypatch.setattr(broken, "featurize_rows", dying)
    with pytest.raises(KeyboardInterrupt):
        fit_store(broken, (x, y), tmp_path / "half.zarr", chunk_rows=CHUNK)
    assert FeatureStore.open(tmp_path / "half.zarr").pending_chunks() == [1, 2, 3]
    late = y.clone()
    late[50] = (late[50] + 1) % 3
    resumed = _attributor(model, trajectory)
    _no_curvature(monkeypatch, resumed)
    with pytest.raises(DataMismatchError, match="chunk 3 "):
        fit_store(resumed, (x, late), tmp_path / "half.zarr", chunk_rows=CHUNK)


# --------------------------------------------------------------------- 2. damaged chunks
def _chunk_file(path: Path, name: str, index: int) -> Path:
    ndim = {"features": 2, "row_scale": 1, "self_influence": 1}[name]
    return path / name / "c" / str(index) / Path(*("0" * (ndim - 1)))


def test_damaged_chunks_fail_on_read_and_fit_recomputes_them(run, tmp_path, monkeypatch):
    model, trajectory, train = run
    path = tmp_path / "s.zarr"
    store = _fitted(run, path, dtype="float16")
    features, self_inf = store.read_rows(0, 60), store.self_influence()
    queries = np.random.default_rng(0).standard_normal((3, store.layout.dim)).astype(np.float32)

    _chunk_file(path, "features", 1).unlink()  # would read back as zeros
    with pytest.raises(StoreCorruptError, match=r"chunk 1 of 'features' .* is missing"):
        FeatureStore.open(path).read_rows(0, 60)
    with pytest.raises(StoreCorruptError, match="chunk 1 of 'features'"):
        exact_topk(FeatureStore.open(path), queries, 5, progress=False)
    FeatureStore.open(path).read_rows(0, 16)  # the intact chunk 0 still reads

    scale = _chunk_file(path, "row_scale", 2)
    data = bytearray(scale.read_bytes())
    data[5] ^= 0x10  # one flipped bit
    scale.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match=r"chunk 2 of 'row_scale' .* fails its digest check"):
        FeatureStore.open(path).read_rows(32, 40)

    _chunk_file(path, "self_influence", 0).unlink()
    with pytest.raises(StoreCorruptError, match="chunk 0 of 'self_influence'"):
        FeatureStore.open(path).self_influence()

    truncated = _chunk_file(path, "features", 3)
    truncated.write_bytes(truncated.read_bytes()[:7])
    with pytest.raises(StoreCorruptError, match=r"chunk 3 of 'features' .* unreadable"):
        FeatureStore.open(path).read_rows(50, 60)
    assert set(FeatureStore.open(path).damaged_chunks()) == {0, 1, 2, 3}

    # fit re-verifies the chunks it finds done and recomputes the damaged ones (not the curvature).
    attributor = _attributor(model, trajectory)
    _no_curvature(monkeypatch, attributor)
    repaired, report = fit_store(attributor, train, path, chunk_rows=CHUNK, dtype="float16")
    assert report.repaired_chunks == (0, 1, 2, 3) == report.computed_chunks
    np.testing.assert_array_equal(repaired.read_rows(0, 60), features)
    np.testing.assert_array_equal(repaired.self_influence(), self_inf)
    assert FeatureStore.open(path).damaged_chunks() == {}


def test_missing_metadata_files_are_clear_errors(run, tmp_path):
    path = tmp_path / "s.zarr"
    _fitted(run, path)
    (path / "features" / "zarr.json").unlink()
    with pytest.raises(StoreCorruptError, match=r"array 'features' .*features/zarr.json\) is missing"):
        FeatureStore.open(path).read_rows(0, 10)
    (path / "chunk_digest" / "zarr.json").unlink()
    with pytest.raises(StoreCorruptError, match="ledger chunk_digest/zarr.json is missing"):
        FeatureStore.open(path)
    (path / "zarr.json").unlink()
    with pytest.raises(StoreCorruptError, match="settings file .* is missing"):
        FeatureStore.open(path)


# --------------------------------------------------------------------------- 3. IVF index
def test_ivf_never_returns_missing_ids_and_knows_what_it_was_tuned_for(tmp_path):
    rng = np.random.default_rng(0)
    features = (rng.standard_normal((16, 16))[rng.integers(0, 16, 600)] + 0.5 * rng.standard_normal((600, 16)))
    layout = StoreLayout(600, 16, chunk_rows=64)
    store = FeatureStore.create(tmp_path / "c.zarr", layout, METADATA)
    featurize(store, lambda a, b: features[a:b].astype(np.float32), progress=False)
    index = build_ivf(store, IVFSettings(n_lists=32, train_rows=600, n_probe=1), progress=False)
    queries = rng.standard_normal((20, 16)).astype(np.float32)
    small = exact_proponents_opponents(store, queries, 5, progress=False)
    index.tune(queries, *small, target=0.5, max_fraction=1.0)
    assert index.tuned_for(5, 0.5) and index.tuned_for(5, 0.4)
    assert not index.tuned_for(200, 0.5) and not index.tuned_for(5, 0.99)

    # k = 200 from ~19 rows a cell: the raw IVF result has missing ids; the search does not.
    raw = index.search(queries, 200, n_probe=1, fallback=False)
    assert (raw.ids < 0).any()
    for opponents in (False, True):
        found = index.search(queries, 200, n_probe=1, opponents=opponents)
        exact = exact_topk(store, queries, 200, opponents=opponents, progress=False)
        assert (found.ids >= 0).all() and index.exact_fallbacks > 0
        short = (raw.ids < 0).any(axis=1) if not opponents else np.ones(len(queries), bool)
        full = np.nonzero(short & (found.ids == exact.ids).all(axis=1))[0]
        assert len(full) > 0  # the queries that fell back got the exact lists
        expected = np.einsum("qd,qkd->qk", queries.astype(np.float64), features[found.ids])
        np.testing.assert_allclose(found.scores, expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------ 4. fingerprints
class _Swapped(nn.Module):
    """The test MLP's layer names with another activation."""

    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(4, 6), activation, nn.Linear(6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def test_model_fingerprint_covers_structure_code_and_constant_buffers(run, tmp_path, monkeypatch):
    model, trajectory, train = run
    relu = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    assert ModelFunction.build(relu).fingerprint() != ModelFunction.build(model).fingerprint()
    # Same architecture, other weights (they come from the checkpoints): same fingerprint.
    again = trained_classifier(n=60, epochs=2, seed=3)[0]
    assert ModelFunction.build(again).fingerprint() == ModelFunction.build(model).fingerprint()
    assert ModelFunction.build(_Swapped(nn.Tanh())).fingerprint() != ModelFunction.build(_Swapped(nn.ReLU())).fingerprint()

    _fitted(run, tmp_path / "s.zarr")
    swapped = _attributor(relu, trajectory)
    with pytest.raises(StoreMismatchError, match="model_fingerprint"):
        open_store(swapped, tmp_path / "s.zarr")
    _no_curvature(monkeypatch, swapped)
    with pytest.raises(StoreMismatchError, match="model_fingerprint"):
        fit_store(swapped, train, tmp_path / "s.zarr", chunk_rows=CHUNK)

    # The user edits the forward of their model file: another fingerprint.
    source = "import torch\nfrom torch import nn\nclass Net(nn.Module):\n    def __init__(self):\n" \
             "        super().__init__()\n        self.lin = nn.Linear(4, 3)\n" \
             "        self.register_buffer('mask', torch.ones(3), persistent=False)\n" \
             "    def forward(self, x):\n        return torch.{act}(self.lin(x)) * self.mask\n"
    monkeypatch.syspath_prepend(str(tmp_path))
    prints = []
    for act in ("relu", "tanh"):
        (tmp_path / "user_net.py").write_text(source.format(act=act))
        sys.modules.pop("user_net", None)
        importlib.invalidate_caches()
        net = importlib.import_module("user_net").Net()
        prints.append(ModelFunction.build(net).fingerprint())
    net.mask[0] = 0.0  # a non-persistent buffer: not in any checkpoint, so part of the model
    prints.append(ModelFunction.build(net).fingerprint())
    assert len(set(prints)) == 3


def test_edited_store_settings_fail_their_checksum(run, tmp_path):
    path = tmp_path / "s.zarr"
    _fitted(run, path)
    original = (path / "zarr.json").read_text()
    for edit in ("seed", "n_rows"):
        doc = json.loads(original)
        block = doc["attributes"]["source_proj_store"]
        if edit == "seed":  # consistently, in both places it appears
            block["metadata"]["projection"]["seed"] = 7
            block["metadata"]["source_config"]["seed"] = 7
        else:
            block["layout"]["n_rows"] = 50
        (path / "zarr.json").write_text(json.dumps(doc))
        with pytest.raises(StoreCorruptError, match="checksum of its settings"):
            FeatureStore.open(path)
    (path / "zarr.json").write_text(original)
    FeatureStore.open(path).read_rows(0, 60)


# ------------------------------------------------------------------------------- 5. labels
def test_invalid_classification_labels_are_refused_before_the_curvature_pass(run, tmp_path, monkeypatch):
    model, trajectory, (x, y) = run
    for bad_value, message in ((-100, r"rows \[37\] \(values \[-100\]\) are -100, PyTorch's ignore index"),
                               (3, r"rows \[37\] \(values \[3\]\) are outside \[0, 3\)")):
        labels = y.clone()
        labels[37] = bad_value
        for fit in (lambda a: a.fit((x, labels)), lambda a: fit_store(a, (x, labels), tmp_path / "l.zarr", chunk_rows=CHUNK)):
            attributor = _attributor(model, trajectory)
            _no_curvature(monkeypatch, attributor)
            with pytest.raises(ValueError, match=message):
                fit(attributor)
    assert not (tmp_path / "l.zarr").exists()
    attributor = _attributor(model, trajectory)
    _no_curvature(monkeypatch, attributor)
    with pytest.raises(ValueError, match="integer class indices, got dtype torch.float32"):
        attributor.fit((x, y.float()))
    # A custom task decides for itself (e.g. a language model's -100 is an ignore index).
    Task(loss=lambda o, t: o.sum(dim=1), measurement=lambda o, t: o.sum(dim=1)).check_targets(torch.tensor([-100]), 3)


def test_non_finite_gradients_name_rows_of_the_data_set(run, tmp_path):
    model, trajectory, (x, y) = run
    broken = x.clone()
    broken[37, 1] = float("inf")
    with pytest.raises(NonFiniteError, match=r"first bad rows \[37\] of the data"):
        fit_store(_attributor(model, trajectory), (broken, y), tmp_path / "nan.zarr", chunk_rows=CHUNK)


# ---------------------------------------------------------------------- 6. concurrent writers
def test_lock_admits_one_writer_names_it_and_replaces_stale_locks(tmp_path):
    path = tmp_path / "s.zarr"
    barrier, outcomes = threading.Barrier(2), []

    def contender() -> None:
        barrier.wait()
        try:
            with hold_lock(path) as lock:
                outcomes.append(("held", lock.run_id))
                barrier.wait()  # the other one tries while this one holds it
                barrier.wait()
        except StoreLockedError as exc:
            barrier.wait()
            outcomes.append(("refused", exc))
            barrier.wait()

    threads = [threading.Thread(target=contender) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    kinds = sorted(kind for kind, _ in outcomes)
    assert kinds == ["held", "refused"]
    refused = next(exc for kind, exc in outcomes if kind == "refused")
    held_run = next(run_id for kind, run_id in outcomes if kind == "held")
    assert refused.holder.pid == os.getpid() and refused.holder.host == socket.gethostname()
    assert refused.holder.run_id == held_run and f"process {os.getpid()}" in str(refused)
    assert not lock_path(path).exists()  # released

    # A holder killed with SIGKILL leaves its record, not its lock: the next writer takes over.
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from source_proj.features.lock import StoreLock; "
        f"StoreLock({str(path)!r}, run_id='dead-run').acquire(); print('held', flush=True); time.sleep(60)"
    )], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    with pytest.raises(StoreLockedError, match=f"process {child.pid} on .*run dead-run"):
        StoreLock(path).acquire()
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert read_holder(path).pid == child.pid  # the stale record is still there
    with pytest.raises(StoreError, match="has ended"):
        check_holder(path, "dead-run")
    with StoreLock(path, run_id="next") as lock:
        assert lock.replaced is not None and lock.replaced.pid == child.pid and lock.replaced.run_id == "dead-run"
        assert check_holder(path, "next").pid == os.getpid()
        with pytest.raises(StoreError, match="not locked for run other"):
            check_holder(path, "other")


def _racing_fit(path: str, barrier, refused, results) -> None:
    torch.set_num_threads(1)
    model, trajectory, train = trained_classifier(n=60, epochs=2)
    attributor = _attributor(model, trajectory)
    started = []
    original = attributor.checkpoint_hessian

    def hessian(*args):
        # Only the lock holder gets here; it keeps the lock until the other one was refused,
        # so that a loaded machine cannot let the first fit finish before the second starts.
        if not started and not refused.wait(timeout=120):
            raise TimeoutError("the other fit was never refused")
        started.append(1)
        return original(*args)

    attributor.checkpoint_hessian = hessian
    barrier.wait()
    try:
        fit_store(attributor, train, path, chunk_rows=CHUNK)
        results.put(("done", len(started)))
    except StoreLockedError as exc:
        refused.set()
        results.put(("locked", len(started), exc.holder.pid))


def test_two_racing_fits_one_computes_the_other_is_refused_before_any_work(run, tmp_path):
    context = multiprocessing.get_context("fork")
    barrier, refused, results = context.Barrier(2), context.Event(), context.Queue()
    path = str(tmp_path / "race.zarr")
    procs = [context.Process(target=_racing_fit, args=(path, barrier, refused, results)) for _ in range(2)]
    for p in procs:
        p.start()
    outcomes = sorted([results.get(timeout=300) for _ in procs], key=lambda r: r[0])
    for p in procs:
        p.join(timeout=60)
    assert [o[0] for o in outcomes] == ["done", "locked"]
    assert outcomes[0][1] > 0 and outcomes[1][1] == 0  # the refused one ran no curvature
    assert outcomes[1][2] in [p.pid for p in procs]
    reference = _fitted(run, tmp_path / "alone.zarr")
    np.testing.assert_array_equal(FeatureStore.open(path).read_rows(0, 60), reference.read_rows(0, 60))


# ---------------------------------------------- 7. kills at every write boundary (zarr >= 3.1.3)
N, DIM, SEGMENTS, SEG_DIM = 40, 6, 2, 3
LAYOUT = StoreLayout(N, DIM, "float16", CHUNK, SEGMENTS, SEG_DIM, self_influence=True)
DATA_DIGESTS = [11, 12, 13]


def _write_store(path: Path) -> None:
    """Everything fit_store writes, in its order, without a model: lock, creation (with the
    data digests), curvature, then the chunks (features, scales, segments, self-influence,
    ledger rows)."""
    with hold_lock(path):
        store = FeatureStore.open_or_create(path, LAYOUT, METADATA, DATA_DIGESTS)
        if store.curvature() is None:
            store.write_curvature(np.eye(3)[None].repeat(2, 0)[:, 0] + 1.0, np.eye(3)[None].repeat(2, 0))
        featurize(store, lambda a, b: chunk_with_extras(a, b, DIM, SEGMENTS, SEG_DIM), progress=False)


def _killed_at(path: Path, boundary: int, after: bool) -> int:
    """Run ``_write_store`` in a forked child that SIGKILLs itself at its ``boundary``-th
    atomic file write: just before the rename (temporary file written) or just after it.
    Returns the number of writes seen if it was not killed (the exit code), or -9."""
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            torch.set_num_threads(1)
            seen = [0]
            original = Path.replace

            def replace(self, target):
                if not str(self).endswith(".partial"):
                    return original(self, target)
                seen[0] += 1
                if seen[0] == boundary and not after:
                    os.kill(os.getpid(), signal.SIGKILL)
                result = original(self, target)
                if seen[0] == boundary and after:
                    os.kill(os.getpid(), signal.SIGKILL)
                return result

            Path.replace = replace
            _write_store(path)
            code = min(seen[0], 250)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _contents(path: Path) -> dict:
    import zarr

    group = zarr.open_group(path, mode="r", zarr_format=3)
    arrays = {name: np.asarray(a[...]) for name, a in group.arrays()}
    attrs = dict(group.attrs.asdict()["source_proj_store"])
    attrs.pop("store_id"), attrs.pop("checksum")
    return {"arrays": arrays, "attrs": attrs}


def test_kill_at_every_write_boundary_then_resume_equals_an_uninterrupted_run(tmp_path):
    import zarr

    from source_proj.features.ledger import zarr_version_ok

    assert zarr_version_ok(zarr.__version__)  # the version whose atomic writes this test relies on
    assert not zarr_version_ok("3.0.10") and not zarr_version_ok("3.1.2") and zarr_version_ok("3.1.3")
    total = _killed_at(tmp_path / "count.zarr", 0, False)
    assert total > 3 * 5  # creation, curvature, 3 chunks x (4 arrays + ledger row)
    want = _contents(tmp_path / "count.zarr")
    for boundary in range(1, total + 1):
        for after in (False, True):
            path = tmp_path / f"k{boundary}{'a' if after else 'b'}.zarr"
            assert _killed_at(path, boundary, after) == -signal.SIGKILL
            _write_store(path)  # resume in this process
            got = _contents(path)
            assert got["attrs"] == want["attrs"], (boundary, after)
            assert sorted(got["arrays"]) == sorted(want["arrays"])
            for name, array in want["arrays"].items():
                np.testing.assert_array_equal(got["arrays"][name], array, err_msg=f"{name} @ {boundary} {after}")
            leftovers = [p.name for p in tmp_path.glob(f".{path.name}.*")] + [p.name for p in path.rglob("*.partial")]
            assert leftovers == [] and not lock_path(path).exists(), (boundary, after, leftovers)


# ------------------------------------------------------------------------- command line
TASK_FILE = """
import sys
sys.path.insert(0, {tests!r})
import torch
from tiny_models import blobs, trained_classifier
from source_proj.cli.task_spec import TaskSpec

def _spec(n=60, change=None):
    model, trajectory, (x, y) = trained_classifier(n=n, epochs=2)
    if change is not None:
        x, y = change(x.clone(), y.clone())
    return TaskSpec(model=model, task="classification", trajectory=trajectory, train=(x, y),
                    queries=blobs(7, 4, 3, seed=9), config={{"num_segments": 2, "proj_dim": 8}})

def task():
    return _spec()

def relabelled():  # rows 3 and 40 get another class
    def change(x, y):
        y[[3, 40]] = (y[[3, 40]] + 1) % 3
        return x, y
    return _spec(change=change)

def ignore_index():
    def change(x, y):
        y[41] = -100
        return x, y
    return _spec(change=change)

def nan_input():
    def change(x, y):
        x[23, 0] = float("nan")
        return x, y
    return _spec(change=change)

def larger():
    return _spec(n=400)
"""


@pytest.fixture(scope="module")
def task_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("task") / "integrity_task.py"
    path.write_text(TASK_FILE.format(tests=str(Path(__file__).parent)))
    return path


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from source_proj.cli.main import main

    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_errors_are_one_line_with_exit_code_2_and_verify_finds_and_fit_repairs_damage(task_file, tmp_path, capsys):
    store = tmp_path / "feats.zarr"
    orphan = tmp_path / ".feats.zarr.creating-0123abcd"  # what a kill during creation leaves
    orphan.mkdir()
    fit = ["fit", "--store", str(store), "--chunk-rows", "16", "--quiet"]
    code, _, err = _cli(capsys, *fit, "--task", f"{task_file}:task")
    assert code == 0, err
    assert not orphan.exists()
    code, _, err = _cli(capsys, "verify", "--store", str(store), "--task", f"{task_file}:task", "--quiet")
    assert code == 0 and "no problem found" in err, err

    # Changed data: topk refuses (spot check of the first chunk), verify names the chunk.
    code, out, err = _cli(capsys, "topk", "--task", f"{task_file}:relabelled", "--store", str(store), "--quiet")
    assert code == 2 and out == "" and "of chunk 0 (rows 0-15) changed, the first of 1 differing chunks among the 2 checked" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    code, _, err = _cli(capsys, "verify", "--store", str(store), "--task", f"{task_file}:relabelled", "--quiet")
    assert code == 1 and "chunk 0 (rows 0-15) changed, the first of 2 differing chunks among the 4" in err
    assert "1 problems found" in err

    # Damage: topk refuses in one line (or shows the traceback with --debug); verify lists it;
    # fit recomputes it.
    (store / "features" / "c" / "2" / "0").unlink()
    topk = ["topk", "--task", f"{task_file}:task", "--store", str(store), "-k", "3", "--quiet"]
    code, out, err = _cli(capsys, *topk)
    assert code == 2 and out == "" and "chunk 2 of 'features'" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(StoreCorruptError):
        _cli(capsys, *topk, "--debug")
    code, _, err = _cli(capsys, "verify", "--store", str(store), "--quiet")
    assert code == 1 and "chunk 2 of 'features'" in err
    code, _, err = _cli(capsys, *fit, "--task", f"{task_file}:task")
    assert code == 0 and "1 chunks computed now (1 of them found damaged and recomputed), 3 found done" in err
    code, _, err = _cli(capsys, "verify", "--store", str(store), "--quiet")
    assert code == 0, err

    # Bad labels and NaN inputs: exit code 2 before any curvature, rows named in the data.
    code, _, err = _cli(capsys, *fit[:2], str(tmp_path / "l.zarr"), *fit[3:], "--task", f"{task_file}:ignore_index")
    assert code == 2 and "rows [41]" in err and "-100" in err and not (tmp_path / "l.zarr").exists()
    code, _, err = _cli(capsys, *fit[:2], str(tmp_path / "n.zarr"), *fit[3:], "--task", f"{task_file}:nan_input")
    assert code == 2 and "first bad rows [23] of the data" in err
    code, _, err = _cli(capsys, *topk, "-o", str(tmp_path / "no" / "such" / "dir.csv"))
    assert code == 2 and "does not exist" in err


def test_cli_stale_ivf_index_is_retuned_and_no_missing_ids_are_written(task_file, tmp_path, capsys, monkeypatch):
    import csv
    import io

    from source_proj.retrieval.ivf import ApproxIndex

    store = str(tmp_path / "big.zarr")
    ref = f"{task_file}:larger"
    code, _, err = _cli(capsys, "fit", "--task", ref, "--store", store, "--chunk-rows", "64", "--quiet")
    assert code == 0, err
    base = ["topk", "--task", ref, "--store", store, "--quiet"]
    code, _, err = _cli(capsys, *base, "-k", "5", "--index", "ivf", "--ivf-recall", "0.5")
    assert code == 0 and "saved to" in err, err

    monkeypatch.setattr(ApproxIndex, "save", lambda self, store: (_ for _ in ()).throw(PermissionError("read-only")))
    code, out, err = _cli(capsys, *base, "-k", "60", "--index", "ivf", "--ivf-recall", "0.99")
    assert code == 0, err
    assert "tuned for k = 5, recall 0.5: retuning it for k = 60, recall 0.99" in err
    assert "kept in memory for this run" in err
    found = list(csv.DictReader(io.StringIO(out)))
    code, out, err = _cli(capsys, *base, "-k", "60")
    exact = list(csv.DictReader(io.StringIO(out)))
    assert len(found) == len(exact) == 2 * 7 * 60
    assert all(int(r["train_id"]) >= 0 and float(r["score"]) > -1e30 for r in found)
    for kind in ("proponents", "opponents"):
        ids = [np.array([int(r["train_id"]) for r in rows if r["kind"] == kind]).reshape(7, 60) for rows in (found, exact)]
        assert recall_at_k(*ids) >= 0.99
