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

import tokenpatch
from tokenpatch.measure.evaluate import accuracy, predict
from tokenpatch.measure.flops import count_macs

from real_data import add_real_data_flags, load_real_data, report, show_row

# (label, method, options): idle's official inference rule (the default), its deviations, and
# EViT with and without fusion.
CONFIGS = [
    ("idle (official)", "idle", {}),
    ("idle score=fixed", "idle", {"score": "fixed"}),
    ("idle ranking=softmax", "idle", {"ranking": "softmax"}),
    ("idle schedule=constant", "idle", {"schedule": "constant"}),
    ("idle fixed softmax constant start=2", "idle", {"score": "fixed", "ranking": "softmax", "schedule": "constant",
                                                     "start_block": 2}),
    ("evit", "evit", {}),
    ("evit fuse", "evit", {"fuse": True}),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_real_data_flags(parser)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5])
    parser.add_argument("--only", nargs="+", help="labels of CONFIGS to run (default: all)")
    args = parser.parse_args(argv)

    model, images, labels = load_real_data(parser, args)
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
            show_row(rows)
        tokenpatch.unpatch(model)
    report(f"DeiT-Tiny, {len(labels)} images, {time.time() - started:.0f} s", rows, args, images=len(labels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
