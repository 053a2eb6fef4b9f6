"""The language-model demo (``source-proj demo --lm``) on a shrunken setting: a real
``transformers.Trainer`` AdamW run read back with its optimizer states, attributed, printed."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from source_proj.attributor import SourceAttributor  # noqa: E402
from source_proj.cli.lm_demo import LMDemoSettings, lm_run, run_lm_demo  # noqa: E402
from source_proj.gradients.causal_lm import CausalLMTask  # noqa: E402
from source_proj.trajectory.checkpoints import Trajectory  # noqa: E402


def test_lm_demo_attributes_its_adamw_trainer_run_and_prints_the_top_sequences(tmp_path, capsys):
    settings = LMDemoSettings(topics=1, width=16, layers=1, heads=2, epochs=3)
    scores = run_lm_demo(tmp_path, num_queries=2, top=2, proj_dim=64, curvature_examples=32, settings=settings)
    out = capsys.readouterr().out
    run = lm_run(tmp_path / "trainer", settings)  # the finished run, read back again
    trajectory = run.trajectory
    assert trajectory.optimizer == "adamw" and len(trajectory.checkpoints) == settings.epochs
    assert all(c.optimizer_state is not None for c in trajectory.checkpoints)
    # The demo's scores are the library's on that run: an attributor built by hand agrees.
    queries = run.queries.select(range(2))
    attributor = SourceAttributor(run.model, CausalLMTask(reduction="mean"), trajectory, proj_dim=64, seed=0,
                                  curvature_examples=32, progress=False).fit(run.train)
    expected = attributor.score(queries)
    assert torch.allclose(scores, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    # Adam's preconditioner is used: the same run described without it scores differently.
    as_sgd = Trajectory(tuple(replace(c, optimizer_state=None) for c in trajectory.checkpoints),
                        weight_decay=trajectory.weight_decay)
    plain = SourceAttributor(run.model, CausalLMTask(reduction="mean"), as_sgd, proj_dim=64, seed=0,
                             curvature_examples=32, progress=False).fit(run.train).score(queries)
    assert float((plain - expected).norm() / expected.norm()) > 0.05
    # What it prints: each query's top proponents and opponents, as text, in score order.
    for q in range(2):
        assert f"Held-out sequence #{q}: {queries[q]['text']!r}" in out
        for m in (int(scores[q].argmax()), int(scores[q].argmin())):
            assert f"{float(scores[q, m]):+.4f}  #{m}: {run.train[m]['text']!r}" in out
