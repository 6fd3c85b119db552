"""The ``nextchat`` command: one entry point, one subcommand per capability.

Each subcommand lives beside the code it drives and registers itself through a
``register(subparsers)`` function; they are imported lazily here so that ``nextchat
--help`` stays fast and a missing optional piece only breaks its own command.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules with a register(subparsers) function, in `nextchat --help` order.
_COMMAND_MODULES: list[str] = [
    "nextchat_cli.model",
    "nextchat_cli.coco",
    "nextchat_cli.train",
    "nextchat_cli.serve",
    "nextchat_cli.synth",
    "nextchat_cli.loop",
    "nextchat_cli.prelabel",
    "nextchat_cli.demo_project",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nextchat",
        description=(
            "nextchat-studio: text-prompted pre-annotation with NExT-Chat "
            "(boxes and SAM masks from prompts) for Label Studio."
        ),
        epilog="Run `nextchat COMMAND --help` for the options of one command.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        # Bad input and wrong call order end with the message, not a traceback;
        # -vv shows the traceback for debugging.
        if args.verbose >= 2:
            raise
        print(f"nextchat {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
