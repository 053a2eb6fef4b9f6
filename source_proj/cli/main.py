"""The ``source-proj`` command line.

Each subcommand is registered in :func:`build_parser` with a handler taking the parsed
arguments; ``main`` returns a process exit code.
"""

from __future__ import annotations

import argparse
import sys

from source_proj.cli.commands import add_commands


def _demo(args: argparse.Namespace) -> int:
    from source_proj.cli.demo import run_demo

    run_demo(args.workdir, num_queries=args.queries, top=args.top, proj_dim=args.proj_dim, optimizer=args.optimizer)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="source-proj",
        description="Training data attribution with SOURCE: which training examples made a model "
        "behave as it does on a query, and by how much.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="train a small MLP on scikit-learn's digits and attribute a few test predictions",
        description="Trains a 64-32-10 MLP on the digits data with SGD + momentum, or AdamW with a "
        "warm-up + cosine schedule (checkpoints and optimizer states saved under --workdir and "
        "reused on later runs), runs SOURCE and prints, for a few test digits, the training digits "
        "that most helped (proponents) and hurt (opponents) their prediction.",
    )
    demo.add_argument("--workdir", default="source-proj-demo", help="folder for checkpoints and outputs")
    demo.add_argument("--queries", type=int, default=4, help="test digits to explain (default 4)")
    demo.add_argument("--top", type=int, default=5, help="proponents/opponents shown per digit (default 5)")
    demo.add_argument("--proj-dim", type=int, default=512, help="projection dimension k (default 512)")
    demo.add_argument(
        "--optimizer", choices=("sgd", "adamw"), default="sgd",
        help="train with SGD + momentum (default) or AdamW with warm-up + cosine; for AdamW, SOURCE "
        "uses Adam's preconditioner read from the saved optimizer states",
    )
    demo.set_defaults(handler=_demo)
    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
