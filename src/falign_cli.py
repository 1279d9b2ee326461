"""The ``falign`` command's entry point.

``falign``, ``falign --help`` and ``falign --version`` answer from here without importing torch (the
``falign`` package imports it, which takes seconds); every command goes on to :func:`falign.app.cli.main`.
This module is also where the command list and its one-line descriptions are declared (``falign.app.cli``
builds its parser from them).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

DESCRIPTION = "Train networks with feedback-alignment-family learning rules and measure why they learn."
EPILOG = "run `falign COMMAND --help` for a command's options and examples"
COMMANDS = {
    "train": "train one model with one learning rule",
    "reproduce": "the paper's experiments as one report",
    "bench": "speed and accuracy benchmarks",
    "plot": "figures of one or more runs' diagnostics",
    "rules": "list the learning rules and their options",
}


def version() -> str:
    """falign's version, from the installed distribution's metadata (no import of the package)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("falign")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def top_parser() -> argparse.ArgumentParser:
    """The top-level parser, with every command listed but none of their options."""
    parser = argparse.ArgumentParser(prog="falign", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"falign {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "--version"):
        parser = top_parser()
        if not args:
            parser.print_help()
            return 2
        parser.parse_args(args[:1])  # prints the help or the version and exits 0
    from falign.app.cli import main as run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
