"""The scripts of examples/ run as a user runs them (a subprocess, tiny settings) and what they
print is checked against an independent oracle: the labels or kinds of the rows they name, the
planted flipped labels, a brute-force search of the store's raw features, and the same run
through the command line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _run(args: list[str], tmp_path: Path, timeout: int = 120) -> str:
    env = {**os.environ, "SOURCE_EXAMPLE_TINY": "1", "SOURCE_EXAMPLE_RUN": str(tmp_path / "lm-run"),
           "OMP_NUM_THREADS": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_mlp_example_top_proponents_share_the_query_label(tmp_path: Path) -> None:
    """For a margin, a row that raises the query's margin most is one of the query's class:
    every printed top proponent must carry the query's label (3 classes, 8 queries: chance
    would be about 0.4^8)."""
    out = _run([sys.executable, str(EXAMPLES / "mlp_from_tensors.py")], tmp_path)
    pairs = re.findall(r"query \d+ \(label (\d)\): top proponent row \d+ \(label (\d)", out)
    assert len(pairs) == 8
    assert all(q == m for q, m in pairs), out


def test_store_example_top_k_equals_brute_force_over_the_raw_features(tmp_path: Path) -> None:
    """The top-5 ids printed from the store's exact search equal a brute-force argsort of
    query_features @ features.T read straight from the zarr array (float32 store)."""
    import zarr

    out = _run([sys.executable, str(EXAMPLES / "store_topk.py"), str(tmp_path / "out")], tmp_path)
    printed = [json.loads(ids) for ids in re.findall(r"top proponents (\[[\d, ]+\])", out)]
    q = np.load(tmp_path / "out" / "query_features.npy").astype(np.float64)
    f = zarr.open_array(str(tmp_path / "out" / "features.zarr" / "features"), mode="r")[:].astype(np.float64)
    scores = q @ f.T
    assert len(printed) == len(q) == 64
    for row, ids in zip(scores, printed):
        # ids must be the 5 best (ties to 1e-6 relative may come in either order)
        assert np.allclose(row[ids], np.sort(row)[::-1][:5], rtol=1e-6, atol=1e-9)


def test_curation_example_flags_the_planted_flipped_labels(tmp_path: Path) -> None:
    """10% of labels are flipped at random: flagging 10% of rows at random would catch about
    10% of them; the held-out-loss ranking must catch at least half."""
    out = _run([sys.executable, str(EXAMPLES / "curation.py")], tmp_path)
    flagged, caught, planted = map(int, re.search(r"flagged (\d+) rows, (\d+) of them among the (\d+)", out).groups())
    assert flagged == planted == 30
    assert caught >= 0.5 * planted, out


def test_lm_examples_python_and_command_line_agree_and_match_the_kind(tmp_path: Path) -> None:
    """The Trainer example's top proponent of each held-out sequence is a training sequence of
    the same kind (letters, digits, punctuation: disjoint characters), and the command line on
    the task file (fit a store, then topk --json) names the same rows with the same scores."""
    pytest.importorskip("transformers")
    out = _run([sys.executable, str(EXAMPLES / "hf_trainer_lm.py"), str(tmp_path / "lm-run")], tmp_path)
    found = re.findall(r"query (\d+) \((\w+)\) .*: top proponent #(\d+) \((\w+)\) score ([-+.\de]+)", out)
    assert len(found) == 3
    assert all(qk == mk for _, qk, _, mk, _ in found), out

    cli = [sys.executable, "-m", "source_proj.cli.main"]
    task = ["--task", f"{EXAMPLES / 'lm_task.py'}:task", "--store", str(tmp_path / "lm.zarr"), "--quiet"]
    _run([*cli, "fit", *task], tmp_path)
    results = json.loads(_run([*cli, "topk", *task, "-k", "1", "--kind", "proponents", "--json"], tmp_path))
    assert [(r["query"], r["train_id"]) for r in results] == [(int(q), int(m)) for q, _, m, _, _ in found]
    assert [r["train_text"] for r in results] == [mk for *_, mk, _ in found]
    np.testing.assert_allclose([r["score"] for r in results], [float(s) for *_, s in found], rtol=2e-3)
