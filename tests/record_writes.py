"""Run the tokenpatch CLI, appending ``RANK:FILE`` to the file named first for every file it writes.

Used under ``torchrun`` by the tests to show which processes write."""

import os
import sys
from pathlib import Path

import tokenpatch.checkpoint
import tokenpatch.training.state
from tokenpatch.cli import main

record, argv = Path(sys.argv[1]), sys.argv[2:]
write = tokenpatch.checkpoint.write_atomically


def recorded(path, writer):
    with record.open("a") as log:
        log.write(f"{os.environ['RANK']}:{Path(path).name}\n")
    write(path, writer)


tokenpatch.checkpoint.write_atomically = tokenpatch.training.state.write_atomically = recorded
sys.exit(main(argv))
