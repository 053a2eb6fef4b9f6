"""Smoke run of benchmarks/lds.py in quick mode on the cheapest scenario (3-epoch training).

Oracle: the ground-truth noise the report prints is recomputed from the cached npz file, and
every main-table method of the benchmark appears with an LDS inside [-1, 1].
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from source_proj.evaluation.ground_truth import ground_truth_noise

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("RepSim", "TracIn", "IF (damping 1e-3)", "TRAK", "SOURCE L=1", "query per segment", "defaults")
ADAM_METHODS = (
    "RepSim", "TracIn (Adam preconditioner)", "TracIn (no preconditioner)", "IF (damping 1e-3)", "TRAK",
    "SOURCE preconditioned, paper form", "SOURCE preconditioned, query per segment", "SGD description of the run",
    "SGD description, form and t tuned",
)


@pytest.mark.slow  # about 15 s alone, 40 s on a loaded machine (each)
@pytest.mark.parametrize("scenario,methods", [("digits-noisy", METHODS), ("digits-adamw-noisy", ADAM_METHODS)])
def test_quick_benchmark_runs_and_reports_what_it_measured(tmp_path: Path, scenario: str, methods: tuple) -> None:
    report = tmp_path / "report.md"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "lds.py"), "--quick", "--scenarios", scenario,
        "--workers", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(report),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    text = report.read_text()

    (cache,) = (tmp_path / "cache").glob(f"lds-{scenario}-M*.npz")
    with np.load(cache) as data:
        noise = ground_truth_noise(data["measurements"])
    row = re.search(rf"^\| {scenario} \| 800 \| 2 \| ([-\d.]+) \| ([-\d.]+) \|$", text, re.MULTILINE)
    assert row is not None, text
    assert float(row.group(1)) == round(noise.split_half_reliability, 3)
    assert float(row.group(2)) == round(noise.noise_to_signal, 3)

    for method in methods:
        cells = re.findall(rf"^\| [^|]*{re.escape(method)}[^|]* \| ([-\d.]+) \[", text, re.MULTILINE)
        assert len(cells) >= 2, f"{method} missing from the single-model or ensemble table"
        assert all(-1.0 <= float(c) <= 1.0 for c in cells)
    if scenario == "digits-noisy":  # counterfactual curves are run on the SGD scenarios (a), (b)
        assert "random (same class)" in text
