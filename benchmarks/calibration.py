"""A calibrated method and schedule against tome's default schedule, on images the calibration never saw.

    python benchmarks/calibration.py --data ../shared/data --json benchmarks/results/calibration.json
    python benchmarks/calibration.py --data ../shared/data --methods ats evit idle pitome ppt sait tome

The 500 shared images are split in two halves (even and odd rows of labels.csv). For each half in
turn, ``tokenpatch.calibrate`` searches the schedule on ``--calibration`` images of that half
(no labels used) at each budget, choosing among ``--methods``; both the calibrated model and the
default tome (fitted to the same budget) are then scored on the other half: top-1, agreement with the unpatched model, MACs.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import tokenpatch
from tokenpatch.measure.evaluate import accuracy, predict
from tokenpatch.measure.flops import count_macs

from real_data import add_real_data_flags, load_real_data, report, show_row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_real_data_flags(parser)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.75, 0.65, 0.55])
    parser.add_argument("--calibration", type=int, default=32, help="unlabelled images the search sees")
    parser.add_argument("--methods", nargs="+", default=["tome"],
                        help="methods calibrate chooses among (default: tome, its schedule only)")
    args = parser.parse_args(argv)

    model, images, labels = load_real_data(parser, args)
    base_macs = count_macs(model, images[:1]).total
    halves = {"even": (images[0::2], labels[0::2], images[1::2], labels[1::2]),
              "odd": (images[1::2], labels[1::2], images[0::2], labels[0::2])}
    rows, started = [], time.time()
    for half, (search, _, held_out, held_labels) in halves.items():
        reference = predict(model, held_out)
        rows.append(dict(calibrated_on=half, budget=1.0, schedule="unpatched", macs_ratio=1.0,
                         **vars(accuracy(reference, held_labels, reference))))
        for budget in args.budgets:
            default = tokenpatch.patch(copy.deepcopy(model), "tome", macs_ratio=budget, macs_input=held_out[:1])
            calibrated = copy.deepcopy(model)
            fit = tokenpatch.calibrate(calibrated, search[: args.calibration], budget, methods=args.methods)
            for name, patched in (("default", default), (f"calibrated {fit.method}", calibrated)):
                scores = accuracy(predict(patched, held_out), held_labels, reference)
                macs = count_macs(patched, held_out[:1]).total / base_macs
                rows.append(dict(calibrated_on=half, budget=budget, schedule=name, macs_ratio=macs, **vars(scores)))
                show_row(rows)
            if fit.remaining is not None:
                rows[-1]["remaining"] = [round(share, 3) for share in fit.remaining]
    report(f"DeiT-Tiny, calibrated vs default tome at matched MACs, scored on the held-out half ({len(labels) // 2} images); "
           f"{time.time() - started:.0f} s", [{k: v for k, v in r.items() if k != "remaining"} for r in rows], args,
           calibration_images=args.calibration, schedules=[r for r in rows if "remaining" in r])
    return 0


if __name__ == "__main__":
    sys.exit(main())
