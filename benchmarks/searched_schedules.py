"""DiffRate's published DeiT-T schedules against ``tokenpatch.calibrate`` at the same MACs, on images the search never saw.

    python benchmarks/searched_schedules.py --data ../shared/data --json benchmarks/results/searched_schedules.json

For each of DiffRate's searched DeiT-T schedules (``compression_rate.json`` of ``OpenGVLab/DiffRate``:
0.6, 0.7, 0.8 and 0.9 GFLOPs) run under DiffRate's rule (``diffrate`` with its ``pruned`` and
``merged`` shares), the MAC share it spends is counted, and at that share ``tokenpatch.calibrate``
chooses a method (and tome's schedule) on the first ``--calibration`` images, unlabelled; ``tome``
and ``diffrate`` with their default schedules are fitted to the same share. Every row is scored
on the other images: top-1 and agreement with the unpatched model.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import tokenpatch
from tokenpatch.measure.evaluate import accuracy, predict
from tokenpatch.measure.flops import count_macs
from tokenpatch.methods.diffrate import PUBLISHED, published_schedule

from real_data import add_real_data_flags, load_real_data, report, show_row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_real_data_flags(parser)
    parser.add_argument("--gflops", type=float, nargs="+", default=[g for m, g in PUBLISHED if m == "deit_tiny"])
    parser.add_argument("--calibration", type=int, default=32, help="unlabelled images the search sees")
    args = parser.parse_args(argv)

    model, images, labels = load_real_data(parser, args)
    search, held_out, held_labels = images[: args.calibration], images[args.calibration:], labels[args.calibration:]
    base_macs = count_macs(model, images[:1]).total
    reference = predict(model, held_out)
    rows, started = [dict(schedule_gflops=None, model="unpatched", macs_ratio=1.0,
                          **vars(accuracy(reference, held_labels, reference)))], time.time()

    def score(name: str, patched, gflops: float) -> None:
        macs = count_macs(patched, held_out[:1]).total / base_macs
        rows.append(dict(schedule_gflops=gflops, model=name, macs_ratio=macs,
                         **vars(accuracy(predict(patched, held_out), held_labels, reference))))
        show_row(rows)

    for gflops in args.gflops:
        published = tokenpatch.patch(copy.deepcopy(model), "diffrate", **published_schedule("deit_tiny", gflops))
        score("diffrate, published schedule", published, gflops)
        share = rows[-1]["macs_ratio"]
        for method in ("diffrate", "tome"):
            score(f"{method}, default schedule", tokenpatch.patch(copy.deepcopy(model), method, macs_ratio=share,
                                                                  macs_input=search[:8]), gflops)
        calibrated = copy.deepcopy(model)
        fit = tokenpatch.calibrate(calibrated, search, share, progress=False)
        template = f" {fit.compared[0].options['template']}" if fit.method == "diffrate" else ""
        score(f"calibrate: {fit.method}{template}", calibrated, gflops)
    report(f"DeiT-Tiny, searched schedules at matched MACs, scored on {len(held_labels)} images the search never saw; "
           f"{time.time() - started:.0f} s", rows, args, calibration_images=args.calibration)
    return 0


if __name__ == "__main__":
    sys.exit(main())
