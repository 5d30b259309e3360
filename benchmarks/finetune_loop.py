"""Where the fine-tuning loop's time goes: images/s of data loading, the teacher and the student's step.

    python benchmarks/finetune_loop.py --data ../shared/data --json benchmarks/results/finetune_loop.json

The real DeiT-Tiny patched with ``--method`` at ``--macs-ratio`` of its MACs trains for ``--steps``
steps per round on the first half of the shared images, in two set-ups measured alternately in
one process (``--rounds`` rounds, medians): ``before`` reads every image from disk each epoch and
trains every weight (the loop before the defaults were measured); ``after`` keeps the decoded
images in memory (decoded once before the rounds, as a real run's first epoch does) and freezes the blocks before the first reducing block
(``FinetuneConfig.freeze_prefix``), as ``tokenpatch finetune`` does by default. Each phase is
timed on its own (``tokenpatch.training.loop.LoopTimes``); ``loop`` is the whole step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import tokenpatch
from tokenpatch.data import DEIT_TINY_WEIGHTS, IMAGENET_SAMPLE, RememberedItems, load_deit_tiny, preprocessing_of
from tokenpatch.jobs.finetune import split_dataset
from tokenpatch.measure.report import format_table, write_json
from tokenpatch.training import FinetuneConfig, finetune

from shared_data import add_data_option, shared_data

MODEL = "deit_tiny_patch16_224"
PHASES = ("data", "teacher", "student", "loop")
SETUPS = {"before": {"remember": False, "freeze_prefix": False}, "after": {"remember": True, "freeze_prefix": False},
          "after, frozen prefix": {"remember": True, "freeze_prefix": True}}


def _data_root(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    """The shared data folder (``--data`` or ``$TOKENPATCH_DATA``), or exit naming what is missing."""
    root = shared_data(parser, args)
    if not (root / DEIT_TINY_WEIGHTS).is_file():
        parser.error(f"give --data or set TOKENPATCH_DATA to a folder holding {DEIT_TINY_WEIGHTS}")
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_option(parser)
    parser.add_argument("--method", default="idle")
    parser.add_argument("--macs-ratio", type=float, default=0.6)
    parser.add_argument("--steps", type=int, default=8, help="steps per round (the first round also warms up)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", help="also write the table to this JSON file")
    args = parser.parse_args(argv)
    root = _data_root(parser, args)
    model = tokenpatch.patch(load_deit_tiny(root), args.method, macs_ratio=args.macs_ratio)
    train, _ = split_dataset(preprocessing_of(model), str(root / IMAGENET_SAMPLE), None, 0.5, seed=0)
    remembered = RememberedItems(train)
    for i in range(len(remembered)):  # decoded once up front, as the first epoch of a real run does
        remembered[i]
    rates: dict[str, dict[str, list[float]]] = {name: {p: [] for p in PHASES} for name in SETUPS}
    for round_index in range(args.rounds):
        for name, setup in SETUPS.items():
            torch.manual_seed(round_index)
            loader = DataLoader(remembered if setup["remember"] else train, batch_size=args.batch_size, shuffle=True)
            config = FinetuneConfig(steps=args.steps, freeze_prefix=setup["freeze_prefix"])
            last = finetune(model, loader, config, progress=False)[-1]
            for phase in PHASES:
                rates[name][phase].append(last[f"{phase}_img_s"])
            print(f"round {round_index + 1}, {name}: " + ", ".join(f"{p} {rates[name][p][-1]:.1f}" for p in PHASES),
                  flush=True)
    rows = [{"set-up": name, **{f"{p} img/s": statistics.median(rates[name][p]) for p in PHASES}} for name in SETUPS]
    rows += [{"set-up": f"{row['set-up']} / before", **{f"{p} img/s": row[f"{p} img/s"] / rows[0][f"{p} img/s"]
                                                        for p in PHASES}} for row in rows[1:]]
    print(f"\n{args.method} at {args.macs_ratio} of the MACs, batch {args.batch_size}, {args.steps} steps x "
          f"{args.rounds} rounds per set-up, medians")
    print(format_table(rows, digits=2))
    if args.json:
        write_json({"rows": rows, "rates": rates, **vars(args)}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
