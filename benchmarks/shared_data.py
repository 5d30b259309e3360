"""The ``--data`` option of the benchmarks that run on the shared data (the real DeiT-Tiny's
weights and the labelled ImageNet sample, ``../shared/data/README.md``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenpatch.data import data_dir


def add_data_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--data DIR`` (default: ``$TOKENPATCH_DATA``)."""
    parser.add_argument("--data", help="shared data folder (default: $TOKENPATCH_DATA)")


def shared_data(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    """The shared data folder ``args.data`` names; exits through ``parser.error`` when there is none."""
    root = data_dir(args.data)
    if root is None:
        parser.error("give --data or set TOKENPATCH_DATA to the folder with weights/ and imagenet-sample/")
    return root
