"""Training-free vs briefly fine-tuned accuracy of a patched real DeiT-Tiny (CPU, no labels used).

    python benchmarks/finetune_recovery.py --data ../shared/data --method idle --keep-ratio 0.55 \\
        --steps 300 --mixup 1.0 --json benchmarks/results/finetune_idle_mixup.json

Half of the 500 shared images (seeded split) are used for self-distillation from the unpatched
weights (labels are never read for training); the other half is evaluated before and after:
top-1, agreement with the unpatched model, and MACs. ``recovered`` is the share of the
training-free top-1 drop that fine-tuning won back. ``after_dense`` runs the fine-tuned weights
at keep ratio 1.0 (no reduction): how much the fine-tuning cost the dense model.

The job is :func:`tokenpatch.jobs.finetune.run_finetune_job` (what ``tokenpatch finetune``
runs). Method options, including the method's loss weights, are ``--option KEY=VALUE`` (e.g.
``--option mass=0.9``, ``--option cut_weight=1.0``); fine-tuning options: ``--module-lr``,
``--mixup``, ``--feature-weight``, ``--temperature``, ``--augment``, ``--seed``.
"""

from __future__ import annotations

import argparse
import sys
import time

from tokenpatch.core.options import parse_options
from tokenpatch.core.registry import get_method
from tokenpatch.data import DEIT_TINY_WEIGHTS, IMAGENET_SAMPLE, data_dir
from tokenpatch.jobs.finetune import FinetuneJob, run_finetune_job
from tokenpatch.measure.report import format_table, write_json
from tokenpatch.training import FinetuneConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="shared data folder (default: $TOKENPATCH_DATA)")
    parser.add_argument("--method", default="idle")
    parser.add_argument("--keep-ratio", type=float, default=0.55)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a method option; repeatable")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--module-lr", type=float, default=1e-3)
    parser.add_argument("--mixup", type=float, default=0.0)
    parser.add_argument("--feature-weight", type=float, default=0.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--augment", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the result to this JSON file")
    args = parser.parse_args(argv)
    root = data_dir(args.data)
    if root is None:
        parser.error("give --data or set TOKENPATCH_DATA")
    pairs = [(key, value) for key, _, value in (text.partition("=") for text in args.option)]
    options = parse_options(get_method(args.method).config_class, pairs)
    started = time.time()
    config = FinetuneConfig(steps=args.steps, lr=args.lr, module_lr=args.module_lr, mixup=args.mixup,
                            feature_weight=args.feature_weight, temperature=args.temperature)
    result = run_finetune_job(FinetuneJob(
        model="deit_tiny_patch16_224", data=str(root / IMAGENET_SAMPLE), method=args.method, keep_ratio=args.keep_ratio,
        options=options, checkpoint=str(root / DEIT_TINY_WEIGHTS), val_fraction=0.5, augment=args.augment,
        batch_size=args.batch_size, seed=args.seed, config=config))
    passthrough = [f"--option {text}" for text in args.option] + (["--augment"] if args.augment else [])
    drop_before = result["unpatched"]["top1"] - result["before"]["top1"]
    drop_after = result["unpatched"]["top1"] - result["after"]["top1"]
    rows = [{"": k, "macs_ratio": (1.0 if k == "unpatched" else result["macs"] / result["macs_unpatched"]),
             **result[k]} for k in ("unpatched", "before", "after", "after_dense")]
    rows[-1]["macs_ratio"] = 1.0
    print(f"{args.method}@{args.keep_ratio} {' '.join(passthrough)}, {args.steps} steps x {args.batch_size} on {result['train_images']} images, "
          f"{time.time() - started:.0f} s; validated on {result['val_images']} images")
    print(format_table(rows, digits=3))
    recovered = (drop_before - drop_after) / drop_before if drop_before > 0 else float("nan")
    print(f"top-1 drop: {drop_before:.1f} training-free -> {drop_after:.1f} fine-tuned; recovered {100 * recovered:.0f} %")
    if args.json:
        write_json({**result, "recovered": recovered, "seconds": time.time() - started}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
