"""MkDocs hook: fills docs/cli.md with the help of every ``source-proj`` command, generated from
the argument parser at build time (so the reference cannot drift from the code)."""

from __future__ import annotations

import argparse
import os
from typing import Any

PLACEHOLDER = "<!-- cli-reference -->"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_reference() -> str:
    """Markdown: the top-level usage, then one section per command with its full ``--help``."""
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width: fix it for stable pages
    from source_proj.cli.main import build_parser

    parser = build_parser()
    parts = [f"```text\n{parser.format_help()}```\n"]
    for name, sub in _subcommands(parser).items():
        parts.append(f"## `source-proj {name}`\n\n```text\n{sub.format_help()}```\n")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """Replace the placeholder of the CLI page by the generated reference."""
    if PLACEHOLDER not in markdown:
        return markdown
    return markdown.replace(PLACEHOLDER, cli_reference())
