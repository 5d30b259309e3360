"""The ``tokenpatch`` command's top level: its name, version and the one-line summary of each
command, built without importing torch, so that ``tokenpatch --help`` and ``--version`` answer at
once. The commands' own arguments are in :mod:`tokenpatch.cli.commands`."""

from __future__ import annotations

import argparse
from typing import NoReturn

from .. import __version__

#: each command and its one-line summary, in the order ``tokenpatch --help`` lists them
COMMANDS = {
    "audit": "MACs and throughput of a patched model against the unpatched one",
    "eval": "MACs, top-1/top-5 and agreement with the unpatched model, per method, on an image folder",
    "finetune": "self-distil a patched model from its unpatched weights on an image folder",
    "explain": "PNG overlays of the patches a patched model computed, and its scores",
}


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``--help`` shows the usage), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def top_level_parser() -> tuple[OneLineParser, argparse._SubParsersAction]:
    """The ``tokenpatch`` parser (``--version``, ``--help``) and the action its commands are added to."""
    parser = OneLineParser(prog="tokenpatch", description="Token reduction for pretrained Vision Transformers: "
                           "measure, evaluate, fine-tune and explain a patched model.")
    parser.add_argument("--version", action="version", version=f"tokenpatch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    return parser, commands


def answers_without_commands(argv: list[str]) -> bool:
    """True when ``argv`` asks only the top level (``--help``, ``--version``, nothing): no command runs."""
    return not argv or argv[0] in ("-h", "--help", "--version")


def parse_top_level(argv: list[str]) -> NoReturn:
    """Print the top-level help or version (or the missing-command error) and exit, torch never imported."""
    parser, commands = top_level_parser()
    for name, summary in COMMANDS.items():
        commands.add_parser(name, help=summary)
    parser.parse_args(argv)
    raise AssertionError("argparse exits after --help and --version")  # pragma: no cover
