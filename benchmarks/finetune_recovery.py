"""Training-free vs briefly fine-tuned accuracy of a patched real DeiT-Tiny (CPU, no labels used).

    python benchmarks/finetune_recovery.py --data ../shared/data --method idle --keep-ratio 0.55 \\
        --steps 300 --mixup 1.0 --json benchmarks/results/finetune_idle_mixup.json

Half of the 500 shared images (seeded split) are used for self-distillation from the unpatched
weights (labels are never read for training); the other half is evaluated before and after:
top-1, agreement with the unpatched model, and MACs. ``recovered`` is the share of the
training-free top-1 drop that fine-tuning won back. ``after_dense`` runs the fine-tuned weights
at keep ratio 1.0 (no reduction): how much the fine-tuning cost the dense model.

Method options and loss weights pass through to ``tokenpatch finetune``, e.g.
``--option mass=0.9``, ``--cut-weight 1.0``, ``--module-lr 1e-3``, ``--mixup 1.0``,
``--feature-weight 0.5``.
"""

from __future__ import annotations

import argparse
import sys
import time

from tokenpatch.cli import build_parser, finetune_result
from tokenpatch.data import DEIT_TINY_WEIGHTS, IMAGENET_SAMPLE, data_dir
from tokenpatch.report import format_table, write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="shared data folder (default: $TOKENPATCH_DATA)")
    parser.add_argument("--method", default="idle")
    parser.add_argument("--keep-ratio", default="0.55")
    parser.add_argument("--steps", default="300")
    parser.add_argument("--batch-size", default="32")
    parser.add_argument("--lr", default="2e-5")
    parser.add_argument("--json", help="also write the result to this JSON file")
    args, passthrough = parser.parse_known_args(argv)
    root = data_dir(args.data)
    if root is None:
        parser.error("give --data or set TOKENPATCH_DATA")
    started = time.time()
    result = finetune_result(build_parser().parse_args([
        "finetune", "deit_tiny_patch16_224", "--checkpoint", str(root / DEIT_TINY_WEIGHTS),
        "--data", str(root / IMAGENET_SAMPLE), "--method", args.method, "--keep-ratio", args.keep_ratio,
        "--steps", args.steps, "--batch-size", args.batch_size, "--lr", args.lr, "--val-fraction", "0.5", *passthrough]))
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
