"""The ``source-proj`` command line.

Each subcommand is registered in :func:`build_parser` with a handler taking the parsed
arguments; ``main`` returns a process exit code.
"""

from __future__ import annotations

import argparse
import os
import sys

from source_proj.cli.commands import add_commands, reporting_errors, shared_flags


def _demo(args: argparse.Namespace) -> int:
    if args.lm:
        from source_proj.cli.lm_demo import run_lm_demo

        run_lm_demo(args.workdir or "source-proj-demo-lm", num_queries=args.queries, top=args.top or 3,
                    proj_dim=args.proj_dim or 256, progress=not args.quiet, device=args.device)
        return 0
    from source_proj.cli.demo import run_demo

    run_demo(args.workdir or "source-proj-demo", num_queries=args.queries, top=args.top or 5,
             proj_dim=args.proj_dim or 512, optimizer=args.optimizer, progress=not args.quiet, device=args.device)
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
        help="train a small MLP on scikit-learn's digits (or, with --lm, a tiny GPT-2) and attribute a few predictions",
        description="Trains a 64-32-10 MLP on the digits data with SGD + momentum, or AdamW with a "
        "warm-up + cosine schedule (checkpoints and optimizer states saved under --workdir and "
        "reused on later runs), runs SOURCE and prints, for a few test digits, the training digits "
        "that most helped (proponents) and hurt (opponents) their prediction. With --lm: trains a "
        "character-level GPT-2 with transformers.Trainer on the Python docs that ship with CPython "
        "and prints the training sequences that most raised and lowered the log-probability of a "
        "few held-out sequences (needs pip install 'source-proj[hf]').",
    )
    demo.add_argument("--lm", action="store_true", help="the language-model demo (a few minutes on 2 cores)")
    demo.add_argument("--workdir", help="folder for checkpoints and outputs (default source-proj-demo, "
                      "or source-proj-demo-lm with --lm)")
    demo.add_argument("--queries", type=int, default=4, help="test digits / held-out sequences to explain (default 4)")
    demo.add_argument("--top", type=int, help="proponents/opponents shown per query (default 5, 3 with --lm)")
    demo.add_argument("--proj-dim", type=int, help="projection dimension k (default 512, 256 with --lm)")
    demo.add_argument(
        "--optimizer", choices=("sgd", "adamw"), default="sgd",
        help="train with SGD + momentum (default) or AdamW with warm-up + cosine; for AdamW, SOURCE "
        "uses Adam's preconditioner read from the saved optimizer states (the digits demo)",
    )
    shared_flags(demo)
    demo.set_defaults(handler=reporting_errors(_demo))
    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    return args.handler(args)


def run() -> None:
    """The ``source-proj`` program: :func:`main`, then an immediate exit.

    Once a command has finished (outputs written and closed, worker threads joined, the process
    group destroyed), the process ends with ``os._exit`` after flushing its streams instead of
    tearing the interpreter down. Finalisation frees every tensor and module one by one (over a
    second for a language model) and can run C++ destructors of native threads still attached to
    the interpreter (gloo's, OpenMP's), which abort a process with "terminate called without an
    active exception" when one is still joinable; neither does anything a finished command needs.
    """
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
