"""Feature store: exact round trips, float16 error bound, resumption after SIGKILL, mismatches."""

from __future__ import annotations

import copy
import json
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
from store_helpers import METADATA, chunk_features, chunk_with_extras, dense_store

from source_proj.features.errors import StoreError, StoreIncompleteError, StoreMismatchError
from source_proj.features.featurize import featurize
from source_proj.features.layout import ChunkFeatures, StoreLayout
from source_proj.features.store import FeatureStore

# float16 stores round every value x to x(1 + d) with |d| <= 2^-11 (unit roundoff; the
# per-row power-of-two scale keeps values out of the subnormal range): hence
# |score16 - score| <= 2^-11 * |q| * |f| by Cauchy-Schwarz.
F16_REL = 2.0**-11


def test_float32_store_round_trips_exactly(tmp_path: Path) -> None:
    features = chunk_features(0, 1000, 16)
    store = dense_store(tmp_path / "s.zarr", features, chunk_rows=64)
    reopened = FeatureStore.open(tmp_path / "s.zarr")
    assert reopened.is_complete and reopened.layout == store.layout
    np.testing.assert_array_equal(reopened.read_rows(0, 1000), features)
    np.testing.assert_array_equal(reopened.read_rows(70, 333), features[70:333])
    for prefetch in (True, False):
        blocks = list(reopened.iter_blocks(100, prefetch=prefetch))
        assert [s for s, _ in blocks] == list(range(0, 1000, 128))  # rounded up to whole chunks
        np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), features)
        # Reused buffers: the same blocks, each valid until the next is requested.
        copies, owners = [], set()
        for start, block in reopened.iter_blocks(100, prefetch=prefetch, reuse_buffers=True):
            copies.append((start, block.copy()))
            owners.add(block.base.__array_interface__["data"][0] if block.base is not None else id(block))
        assert [s for s, _ in copies] == list(range(0, 1000, 128))
        np.testing.assert_array_equal(np.concatenate([b for _, b in copies]), features)
        assert len(owners) == (2 if prefetch else 1)
    out = np.full((263, 16), np.nan, dtype=np.float32)
    assert reopened.read_rows(70, 333, out=out) is out
    np.testing.assert_array_equal(out, features[70:333])
    with pytest.raises(ValueError, match="C-contiguous float32"):
        reopened.read_rows(70, 333, out=np.empty((263, 16)))


def test_float16_store_error_bounds_and_no_overflow(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    features = chunk_features(0, 600, 32)
    features[:5] *= 1e30  # far beyond float16's 65504
    features[5:10] *= 1e-30  # far below its smallest subnormal
    features[10] = 0.0
    queries = rng.standard_normal((7, 32))
    f16 = dense_store(tmp_path / "h.zarr", features, dtype="float16").read_rows(0, 600).astype(np.float64)
    assert np.all(np.isfinite(f16))
    exact = features.astype(np.float64)
    assert np.all(np.abs(f16 - exact) <= F16_REL * np.abs(exact))
    scores16, scores = queries @ f16.T, queries @ exact.T
    bound = F16_REL * np.linalg.norm(queries, axis=1)[:, None] * np.linalg.norm(exact, axis=1)[None, :]
    assert np.all(np.abs(scores16 - scores) <= bound)
    # The bound is not vacuous: the typical error is well inside it but not zero.
    assert 0 < np.median(np.abs(scores16 - scores) / np.maximum(bound, 1e-300)) < 0.1


def test_segment_features_and_self_influence(tmp_path: Path) -> None:
    layout = StoreLayout(300, 12, "float16", 64, n_segments=3, segment_dim=4, self_influence=True)
    store = FeatureStore.create(tmp_path / "s.zarr", layout, METADATA)
    featurize(store, lambda a, b: chunk_with_extras(a, b, 12, 3, 4), progress=False)
    full = chunk_with_extras(0, 300, 12, 3, 4)
    np.testing.assert_array_equal(store.self_influence(), full.self_influence)
    summed = store.read_rows(10, 200, segments=[2, 0])
    expected = full.segment_features[10:200][:, [0, 2]].astype(np.float64).sum(axis=1)
    scale = np.abs(full.segment_features[10:200]).max(axis=(1, 2))[:, None]
    assert np.all(np.abs(summed - expected) <= 2 * F16_REL * 2 * scale)
    assert store.feature_dim([0]) == 4 and store.feature_dim() == 12
    with pytest.raises(ValueError, match="segments"):
        store.read_rows(0, 10, segments=[3])


def test_curvature_round_trip_and_refusal(tmp_path: Path) -> None:
    store = dense_store(tmp_path / "s.zarr", chunk_features(0, 50, 8))
    assert store.curvature() is None
    rng = np.random.default_rng(0)
    values, vectors = rng.random((2, 8)), rng.standard_normal((2, 8, 8))
    store.write_curvature(values, vectors)
    got_values, got_vectors = FeatureStore.open(tmp_path / "s.zarr").curvature()
    np.testing.assert_array_equal(got_values, values)
    np.testing.assert_array_equal(got_vectors, vectors)
    with pytest.raises(StoreError, match="already holds"):
        store.write_curvature(values, vectors)
    with pytest.raises(ValueError, match="eigenvectors"):
        FeatureStore.open(dense_store(tmp_path / "t.zarr", chunk_features(0, 5, 8)).path, writable=True) \
            .write_curvature(values, vectors[:, :3])


@pytest.mark.parametrize(
    "field, value",
    [
        ("projection.seed", 4),
        ("projection.dim", 32),
        ("projection.kind", "gaussian"),
        ("model_fingerprint", "ffffff"),
        ("trajectory.lrs", [0.1, 0.1, 0.05, 0.01]),
    ],
)
def test_mismatched_metadata_names_the_field(tmp_path: Path, field: str, value: object) -> None:
    features = chunk_features(0, 100, 16)
    dense_store(tmp_path / "s.zarr", features)
    other = copy.deepcopy(METADATA)
    *parents, leaf = field.split(".")
    target = other
    for key in parents:
        target = target[key]
    stored = target[leaf]
    target[leaf] = value
    layout = StoreLayout(100, 16, chunk_rows=64)
    for attempt in (
        lambda: FeatureStore.open(tmp_path / "s.zarr", expected_metadata=other),
        lambda: FeatureStore.open_or_create(tmp_path / "s.zarr", layout, other),
    ):
        with pytest.raises(StoreMismatchError) as info:
            attempt()
        assert info.value.field == f"metadata.{field}"
        assert (info.value.stored, info.value.expected) == (stored, value)
        assert field in str(info.value)


def test_mismatched_layout_names_the_field(tmp_path: Path) -> None:
    dense_store(tmp_path / "s.zarr", chunk_features(0, 100, 16))
    for field, layout in (
        ("layout.dim", StoreLayout(100, 32, chunk_rows=64)),
        ("layout.n_rows", StoreLayout(101, 16, chunk_rows=64)),
        ("layout.dtype", StoreLayout(100, 16, "float16", chunk_rows=64)),
    ):
        with pytest.raises(StoreMismatchError) as info:
            FeatureStore.open_or_create(tmp_path / "s.zarr", layout, METADATA)
        assert info.value.field == field


def test_bad_inputs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        StoreLayout(10, 4, "float64")
    with pytest.raises(ValueError, match="n_rows"):
        StoreLayout(0, 4)
    with pytest.raises(FileNotFoundError):
        FeatureStore.open(tmp_path / "missing.zarr")
    with pytest.raises(ValueError, match="JSON"):
        FeatureStore.create(tmp_path / "j.zarr", StoreLayout(10, 4), {"x": object()})
    store = FeatureStore.create(tmp_path / "s.zarr", StoreLayout(100, 4, chunk_rows=32), METADATA)
    with pytest.raises(FileExistsError):
        FeatureStore.create(tmp_path / "s.zarr", StoreLayout(100, 4, chunk_rows=32), METADATA)
    with pytest.raises(ValueError, match=r"shape \(32, 5\)"):
        featurize(store, lambda a, b: np.zeros((b - a, 5)), progress=False)
    with pytest.raises(ValueError, match="non-finite features for rows \\[3\\]"):
        featurize(store, lambda a, b: np.where(np.arange(b - a)[:, None] == 3, np.nan, 1.0) * np.ones((1, 4)),
                  progress=False)
    with pytest.raises(ValueError, match="without segment_features"):
        featurize(store, lambda a, b: ChunkFeatures(np.ones((b - a, 4)), np.ones((b - a, 2, 2))), progress=False)
    with pytest.raises(StoreIncompleteError, match="4 chunks pending"):
        list(store.iter_blocks(64))
    with pytest.raises(StoreIncompleteError):
        store.read_rows(0, 10)
    not_a_store = zarr.open_group(tmp_path / "plain.zarr", mode="w", zarr_format=3)
    assert not_a_store is not None
    with pytest.raises(StoreError, match="not a source_proj feature store"):
        FeatureStore.open(tmp_path / "plain.zarr")


# ------------------------------------------------------------------------- interruption
N, DIM, CHUNK, SEGMENTS, SEG_DIM = 1300, 24, 64, 2, 6  # 21 chunks, the last one partial
LAYOUT = StoreLayout(N, DIM, "float16", CHUNK, SEGMENTS, SEG_DIM, self_influence=True)

_CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    sys.path.insert(0, {tests!r})
    from store_helpers import METADATA, chunk_with_extras
    from source_proj.features.featurize import featurize
    from source_proj.features.layout import StoreLayout
    from source_proj.features.store import FeatureStore

    def compute(start, stop):
        with open({log!r}, "a") as log:
            log.write(f"{{start}}\\n")
        if start == {kill_at} * {chunk}:
            os.kill(os.getpid(), signal.SIGKILL)  # mid-run, this chunk computed, not written
        time.sleep({delay})
        return chunk_with_extras(start, stop, {dim}, {segments}, {seg_dim})

    store = FeatureStore.open_or_create({path!r}, StoreLayout(**{layout!r}), METADATA)
    featurize(store, compute, progress=False)
    """
)


def _start_child(path: Path, log: Path, kill_at: int, delay: float) -> subprocess.Popen:
    from dataclasses import asdict

    code = _CHILD.format(
        tests=str(Path(__file__).parent), log=str(log), kill_at=kill_at, chunk=CHUNK, delay=delay,
        dim=DIM, segments=SEGMENTS, seg_dim=SEG_DIM, path=str(path), layout=asdict(LAYOUT),
    )
    return subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)


def _store_contents(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(path, mode="r", zarr_format=3)
    return {name: np.asarray(array[...]) for name, array in group.arrays()}


@pytest.mark.parametrize("killer", ["self", "parent"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path: Path, killer: str) -> None:
    path, log = tmp_path / "killed.zarr", tmp_path / "calls.log"
    if killer == "self":  # deterministic: dies while computing chunk 7, chunks 0-5 surely written
        child = _start_child(path, log, kill_at=7, delay=0.0)
        child.wait(timeout=120)
    else:  # the parent kills at an arbitrary moment once a few chunks are done
        child = _start_child(path, log, kill_at=-1, delay=0.01)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if path.exists() and len(FeatureStore.open(path).pending_chunks()) <= LAYOUT.n_chunks - 5:
                break
            time.sleep(0.005)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()

    pending_at_kill = FeatureStore.open(path).pending_chunks()
    called_before = [int(line) // CHUNK for line in log.read_text().split()]
    done_at_kill = sorted(set(range(LAYOUT.n_chunks)) - set(pending_at_kill))
    assert 0 < len(done_at_kill) < LAYOUT.n_chunks
    assert done_at_kill == sorted(set(called_before) - set(pending_at_kill))
    if killer == "self":  # chunk 6 was being written in the background when 7 was computed
        assert done_at_kill in (list(range(6)), list(range(7))) and called_before == list(range(8))

    calls: list[int] = []

    def counting(start: int, stop: int) -> ChunkFeatures:
        calls.append(start // CHUNK)
        return chunk_with_extras(start, stop, DIM, SEGMENTS, SEG_DIM)

    resumed = FeatureStore.open_or_create(path, LAYOUT, METADATA)
    report = featurize(resumed, counting, progress=False)
    assert calls == pending_at_kill == list(report.computed_chunks)  # nothing written is recomputed
    assert report.skipped_chunks == len(done_at_kill)
    assert resumed.is_complete

    reference = FeatureStore.create(tmp_path / "reference.zarr", LAYOUT, METADATA)
    featurize(reference, lambda a, b: chunk_with_extras(a, b, DIM, SEGMENTS, SEG_DIM), progress=False)
    got, want = _store_contents(path), _store_contents(reference.path)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    attrs = {p: json.loads((p / "zarr.json").read_text())["attributes"] for p in (path, reference.path)}
    for a in attrs.values():
        a["source_proj_store"].pop("store_id")
        a["source_proj_store"].pop("checksum")  # covers the store id
    assert attrs[path] == attrs[reference.path]
    assert not list(path.rglob("*.partial"))
