"""The digits demo's AdamW option: its trajectory is saved and reloaded with its optimizer states."""

import dataclasses

import torch

from source_proj.attributor import SourceAttributor
from source_proj.cli.demo import DIGITS_ADAMW_SETTINGS, digits_run
from source_proj.cli.main import build_parser


def test_adamw_demo_run_reloads_checkpoints_and_optimizer_states(tmp_path):
    settings = dataclasses.replace(DIGITS_ADAMW_SETTINGS, epochs=2)
    first = digits_run(tmp_path, settings)
    assert first.trajectory.optimizer == "adamw"
    assert sorted(p.name for p in tmp_path.glob("optimizer-*.pt")) == ["optimizer-0-0.pt", "optimizer-0-1.pt"]
    again = digits_run(tmp_path, settings)  # from the manifest, nothing retrained
    assert [c.optimizer_state for c in again.trajectory.checkpoints] == [c.optimizer_state for c in first.trajectory.checkpoints]
    assert again.trajectory.summary() == first.trajectory.summary()
    a, b = (SourceAttributor(r.model, "classification", r.trajectory, proj_dim=8, num_segments=2, progress=False)
            for r in (first, again))
    assert a.preconditioner.digests == b.preconditioner.digests
    # The reloaded states are the files torch saved: their step counts are the cumulative ones.
    saved = torch.load(first.trajectory.checkpoints[-1].optimizer_state, weights_only=True)
    assert float(saved["state"][0]["step"]) == first.trajectory.cumulative_steps(1)
    args = build_parser().parse_args(["demo", "--optimizer", "adamw"])
    assert args.optimizer == "adamw"
