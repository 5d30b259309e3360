"""Training-free accuracy vs MACs on the real DeiT-Tiny and the 500-image ImageNet sample.

    python benchmarks/accuracy.py --data ../shared/data --json benchmarks/results/accuracy.json

Prints one row per (method, options, keep_ratio): MACs (fvcore, 224x224), MACs ratio to the
unpatched model, top-1, top-5, agreement with the unpatched top-1, and top-1 drop. All numbers
come from this run; the unpatched model is evaluated in the same process.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import tokenpatch
from tokenpatch.data import IMAGENET_SAMPLE, LabelledImages, data_dir, eval_transform, load_deit_tiny, load_images
from tokenpatch.measure.evaluate import accuracy, predict
from tokenpatch.measure.flops import count_macs
from tokenpatch.measure.report import format_table, write_json

# (label, method, options): the default idle, its schedule and score alternatives, the paper's
# own inference setting, and EViT with and without fusion.
CONFIGS = [
    ("idle (default)", "idle", {}),
    ("idle geometric", "idle", {"schedule": "geometric"}),
    ("idle score=fresh", "idle", {"score": "fresh"}),
    ("idle score=previous", "idle", {"score": "previous"}),
    ("idle score=carried", "idle", {"score": "carried"}),
    ("idle start=3", "idle", {"start_block": 3}),
    ("idle paper (start=3, geometric, fresh)", "idle", {"start_block": 3, "schedule": "geometric", "score": "fresh"}),
    ("evit", "evit", {}),
    ("evit fuse", "evit", {"fuse": True}),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="shared data folder (default: $TOKENPATCH_DATA)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5])
    parser.add_argument("--only", nargs="+", help="labels of CONFIGS to run (default: all)")
    parser.add_argument("--limit", type=int, help="use only the first N images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    root = data_dir(args.data)
    if root is None:
        parser.error("give --data or set TOKENPATCH_DATA to the folder with weights/ and imagenet-sample/")
    torch.set_num_threads(args.threads)
    model = load_deit_tiny(root)
    images, labels = load_images(LabelledImages(root / IMAGENET_SAMPLE, transform=eval_transform(model)), args.limit)
    reference = predict(model, images, progress=True, desc="unpatched")
    base_macs = count_macs(model).total
    base = accuracy(reference, labels, reference)
    rows = [dict(config="unpatched", keep_ratio=1.0, gmacs=base_macs / 1e9, macs_ratio=1.0,
                 top1=base.top1, top5=base.top5, agreement=base.agreement, top1_drop=0.0)]
    configs = [c for c in CONFIGS if not args.only or c[0] in args.only]
    started = time.time()
    for label, method, options in configs:
        tokenpatch.patch(model, method, keep_ratio=1.0, **options)
        for ratio in args.ratios:
            tokenpatch.set_keep_ratio(model, ratio)
            macs = count_macs(model).total
            result = accuracy(predict(model, images, progress=True, desc=f"{label} r={ratio}"), labels, reference)
            rows.append(dict(config=label, keep_ratio=ratio, gmacs=macs / 1e9, macs_ratio=macs / base_macs,
                             top1=result.top1, top5=result.top5, agreement=result.agreement,
                             top1_drop=base.top1 - result.top1))
            print(format_table(rows[-1:], digits=3).splitlines()[-1], file=sys.stderr, flush=True)
        tokenpatch.unpatch(model)
    print(f"DeiT-Tiny, {len(labels)} images, {time.time() - started:.0f} s")
    print(format_table(rows, digits=3))
    if args.json:
        write_json({"model": "deit_tiny_patch16_224", "images": len(labels), "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
