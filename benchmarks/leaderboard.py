"""Every method on the real DeiT-Tiny at matched MAC budgets, training-free: a thin script over ``tokenpatch eval``.

    python benchmarks/leaderboard.py --data ../shared/data --json benchmarks/results/leaderboard.json \
        --plot docs/benchmarks/leaderboard.png
    python benchmarks/leaderboard.py --replot benchmarks/results/leaderboard.json --plot docs/benchmarks/leaderboard.png

For each budget (share of the unpatched MACs) every method, with its default (official) options,
is fitted to the budget on the first ``--calibration`` images and measured on all images by
:func:`tokenpatch.jobs.evaluation.evaluation_rows`, the function behind ``tokenpatch eval``:
MACs per image (fvcore), top-1, top-5 and agreement with the unpatched top-1. ``dynamicvit`` and
``iared2`` learn their policies; here they run untrained (random predictors, interpreters at
their initialisation), which the table marks. Throughput is ``benchmarks/throughput.py``'s job.
Writes JSON and a Pareto plot (top-1 vs MACs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import tokenpatch
from tokenpatch.core.registry import get_method
from tokenpatch.jobs.evaluation import MethodSpec, evaluation_rows, in_batches
from tokenpatch.measure.plot import pareto_figure

from real_data import add_real_data_flags, load_real_data, report

COLUMNS = ["method", "budget", "keep_ratio", "macs_ratio", "gmacs", "top1", "top5", "agreement"]


def pareto_plot(rows: list[dict], base_top1: float, path: str, images: int) -> None:
    """The leaderboard's Pareto figure (top-1 against MACs), every reached point labelled."""
    pareto_figure(rows, base_top1, f"DeiT-Tiny, {images} ImageNet validation images, training-free", path)


def replot(results: str, path: str) -> None:
    """Draw the figure of a committed result file again, without measuring."""
    with open(results) as f:
        saved = json.load(f)
    pareto_plot(saved["rows"], saved["unpatched"]["top1"], path, saved["images"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_real_data_flags(parser)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.75, 0.65, 0.5])
    parser.add_argument("--methods", nargs="+", default=sorted(tokenpatch.available_methods()),
                        help="METHOD or METHOD:KEY=VALUE,... (default: every registered method)")
    parser.add_argument("--calibration", type=int, default=8, help="images the keep ratio is fitted on")
    parser.add_argument("--mac-images", type=int, default=16, help="images MACs are counted on, one by one")
    parser.add_argument("--plot", help="write the Pareto plot (PNG) here (needs matplotlib: the plot extra)")
    parser.add_argument("--replot", metavar="RESULTS_JSON",
                        help="only draw --plot from a result file this script wrote (no data, no measuring)")
    args = parser.parse_args(argv)
    if args.replot:
        replot(args.replot, args.plot or parser.error("--replot needs --plot"))
        return 0

    model, images, labels = load_real_data(parser, args)
    torch.manual_seed(0)  # the untrained predictors/interpreters of the learned methods
    specs = [MethodSpec.parse(text) for text in args.methods]
    specs = [MethodSpec(s.name, s.options, f"{s.label} (untrained)" if get_method(s.name).needs_training else s.label)
             for s in specs]
    started, rows, base = time.time(), [], None
    for budget in args.budgets:
        measured = evaluation_rows(model, in_batches(images, labels), specs, images[:max(args.calibration, args.mac_images)],
                                   macs_ratio=budget, calibration=args.calibration, mac_images=args.mac_images)
        base = measured[0]
        rows += [{**row, "budget": budget} for row in measured[1:]]
    rows.sort(key=lambda r: (-r["budget"], -(r.get("top1") or -1.0)))
    title = (f"DeiT-Tiny, {len(labels)} images, unpatched top-1 {base['top1']:.1f} / top-5 {base['top5']:.1f}, "
             f"{base['gmacs']:.3f} GMACs; {time.time() - started:.0f} s, {torch.get_num_threads()} threads")
    report(title, [{c: r.get(c) for c in COLUMNS} for r in rows if "note" not in r], args,
           images=len(labels), unpatched=base, unreachable=[r for r in rows if "note" in r])
    for row in rows:
        if "note" in row:
            print(f"not reachable at {row['budget']}: {row['note']}")
    if args.plot:
        pareto_plot(rows, base["top1"], args.plot, len(labels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
