"""SourceConfig's fields carry what the package derives from them: the command line's flags and
help, the run-time / recorded split and what stores record."""

import dataclasses

from source_proj.cli.commands import _given_settings
from source_proj.cli.main import build_parser
from source_proj.config import RUNTIME_FIELDS, SourceConfig

FIELDS = dataclasses.fields(SourceConfig)


def test_every_setting_with_a_flag_is_on_the_fit_command_with_its_help_and_default():
    parser = build_parser()
    fit_help = parser.parse_args(["fit", "--task", "x:y", "--store", "s"]).__dict__
    flagged = [f for f in FIELDS if f.metadata["flag"]]
    assert {f.name for f in flagged} >= {"proj_dim", "seed", "num_segments", "query_mode", "segment_projections"}
    for f in flagged:
        assert fit_help[f.name] is None  # absent: the task's config, then the default, apply
    text = parser._subparsers._group_actions[0].choices["fit"].format_help()
    for f in flagged:
        assert f.metadata["flag"] in text
    assert "(default 1024)" in text and "(default off)" in text
    sections = {"projection settings:": "--proj-dim", "estimator settings:": "--num-segments",
                "runtime settings:": "--batch-size"}
    for title, flag in sections.items():  # each flag listed under its field's group
        section = text[text.index(title):].split("\n\n")[0]
        assert f"  {flag}" in section


def test_flags_become_settings_and_only_run_time_ones_apply_to_queries():
    parser = build_parser()
    args = parser.parse_args(["fit", "--task", "x:y", "--store", "s", "--proj-dim", "64", "--keep-segments",
                              "--query-mode", "final", "--batch-size", "8", "--device", "cpu"])
    given = _given_settings(args)
    assert given == {"proj_dim": 64, "keep_segment_features": True, "query_mode": "final", "chunk_size": 8,
                     "device": "cpu"}
    config = SourceConfig(**given)
    assert (config.proj_dim, config.keep_segment_features, config.chunk_size) == (64, True, 8)
    topk = parser.parse_args(["topk", "--task", "x:y", "--store", "s", "--batch-size", "4"])
    assert _given_settings(topk) == {"chunk_size": 4}


def test_stores_record_exactly_the_settings_that_change_the_features():
    recorded = SourceConfig(chunk_size=7, device="cpu", progress=False, verbose=True).recorded_settings()
    assert not set(recorded) & set(RUNTIME_FIELDS)
    assert set(recorded) | set(RUNTIME_FIELDS) | {"segment_projections"} == {f.name for f in FIELDS}
    # An added setting is recorded only off its default, so stores written before it keep opening.
    assert "segment_projections" not in recorded
    assert SourceConfig(segment_projections=True).recorded_settings()["segment_projections"] is True
