"""Command line: ``tokenpatch audit MODEL`` measures what a patch buys (MACs and throughput);
``tokenpatch eval MODEL --data DIR`` measures what it costs (accuracy and agreement, per method);
``tokenpatch finetune MODEL --data DIR`` self-distils a patched model (also under ``torchrun``);
``tokenpatch explain MODEL IMAGE...`` draws what it computed. Argument parsing only: the work is
in :mod:`tokenpatch.jobs`. The commands (:mod:`tokenpatch.cli.commands`) import torch; the top
level (:mod:`tokenpatch.cli.parser`) does not, so ``--help`` and ``--version`` answer at once."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .parser import answers_without_commands, parse_top_level


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``tokenpatch`` command: 0 on success, 2 with one line on a user error
    (a bad argument, path, image or checkpoint, or a file that cannot be written), 130 on Ctrl-C."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if answers_without_commands(argv):
        parse_top_level(argv)
    from .commands import run_command  # torch, timm: only once a command runs

    return run_command(argv)


def build_parser() -> argparse.ArgumentParser:
    """The full parser of every command (imports the commands, and so torch)."""
    from .commands import build_parser as build

    return build()
