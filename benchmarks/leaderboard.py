"""Every method on the real DeiT-Tiny at matched MAC budgets, training-free, measured the same way.

    python benchmarks/leaderboard.py --data ../shared/data --json benchmarks/results/leaderboard.json \
        --plot benchmarks/results/leaderboard.png

For each method (its default options) and each budget (share of the unpatched MACs), the keep
ratio is solved with ``tokenpatch.set_macs_ratio`` on ``--calibration`` images, then measured:
MACs per image (fvcore, mean over ``--mac-images`` images, as per-image counts vary for ats,
sait with mass and iared2), top-1, top-5 and agreement with the unpatched top-1 on all images,
and CPU throughput at batch 1 and 32 on real images, every model of a budget timed alternately
with the unpatched one (medians; speedup = median of the paired ratios). ``dynamicvit`` and
``iared2`` learn their policies; here they run untrained (random predictors, interpreters at
their initialisation), which the table marks. Writes JSON and a Pareto plot (top-1 vs MACs).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

import tokenpatch
from tokenpatch.measure.budget import mean_macs_per_image
from tokenpatch.data import IMAGENET_SAMPLE, LabelledImages, data_dir, eval_transform, load_deit_tiny, load_images
from tokenpatch.measure.evaluate import accuracy, predict
from tokenpatch.measure.flops import count_macs
from tokenpatch.measure.plot import line_chart
from tokenpatch.measure.report import format_table, write_json
from tokenpatch.measure.speed import compare_throughput, paired_speedup

LEARNED = {"dynamicvit", "iared2"}  # their policies are trained; here they are not
COLUMNS = ["method", "budget", "keep_ratio", "macs_ratio", "top1", "top5", "agreement",
           "img_s_b1", "speedup_b1", "img_s_b32", "speedup_b32"]


def label(method: str) -> str:
    return f"{method} (untrained)" if method in LEARNED else method


def measure_budget(model, methods, budget, images, labels, reference, base_macs, args) -> list[dict]:
    """Rows for one budget: fit each method, count, evaluate, then time them all alternately."""
    patched, rows, unreachable = {}, [], []
    for method in methods:
        candidate = tokenpatch.patch(copy.deepcopy(model), method)
        try:
            fit = tokenpatch.set_macs_ratio(candidate, budget, images[: args.calibration])
        except tokenpatch.InvalidOptionError as exc:  # e.g. ats: de-duplication keeps < 70 % even at K = all
            print(f"{method} @ {budget}: {exc}", file=sys.stderr)
            unreachable.append(dict(method=label(method), budget=budget, unreachable=str(exc)))
            continue
        result = accuracy(predict(candidate, images, progress=True, desc=f"{method} @ {budget}"), labels, reference)
        macs = mean_macs_per_image(candidate, images[: args.mac_images])
        rows.append(dict(method=label(method), budget=budget, keep_ratio=fit.keep_ratio, macs_ratio=macs / base_macs,
                         gmacs=macs / 1e9, top1=result.top1, top5=result.top5, agreement=result.agreement))
        patched[method] = candidate
        print(format_table(rows[-1:], COLUMNS[:7], digits=3).splitlines()[-1], file=sys.stderr, flush=True)
    for batch, repeats in ((1, args.repeats_b1), (32, args.repeats_b32)):
        timings = compare_throughput({"unpatched": model, **patched}, batch, repeats=repeats, inputs=images)
        for row, method in zip(rows, patched):
            row[f"img_s_b{batch}"] = timings[method].median
            row[f"speedup_b{batch}"] = paired_speedup(timings[method], timings["unpatched"])
            row[f"img_s_unpatched_b{batch}"] = timings["unpatched"].median
    return rows + unreachable


def pareto_plot(rows: list[dict], base_top1: float, path: str, images: int) -> None:
    series: dict[str, list[tuple[float, float]]] = {}
    for row in (r for r in rows if "top1" in r):
        series.setdefault(row["method"], [(100.0, base_top1)]).append((100 * row["macs_ratio"], row["top1"]))
    chart = line_chart(series, f"DeiT-Tiny, {images} ImageNet val images, training-free: top-1 vs MACs",
                       "MACs, % of unpatched", "top-1 %")
    chart.save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="shared data folder (default: $TOKENPATCH_DATA)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.75, 0.65, 0.55])
    parser.add_argument("--methods", nargs="+", default=sorted(tokenpatch.available_methods()))
    parser.add_argument("--calibration", type=int, default=4, help="images the keep ratio is fitted on")
    parser.add_argument("--mac-images", type=int, default=16, help="images MACs are counted on, one by one")
    parser.add_argument("--repeats-b1", type=int, default=30)
    parser.add_argument("--repeats-b32", type=int, default=8)
    parser.add_argument("--limit", type=int, help="use only the first N images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--plot", help="write the Pareto plot (PNG) here")
    args = parser.parse_args(argv)

    root = data_dir(args.data)
    if root is None:
        parser.error("give --data or set TOKENPATCH_DATA to the folder with weights/ and imagenet-sample/")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # the untrained predictors/interpreters of the learned methods
    model = load_deit_tiny(root)
    images, labels = load_images(LabelledImages(root / IMAGENET_SAMPLE, transform=eval_transform(model)), args.limit)
    reference = predict(model, images, progress=True, desc="unpatched")
    base = accuracy(reference, labels, reference)
    base_macs = count_macs(model, images[:1]).total
    started = time.time()
    rows = [row for budget in args.budgets
            for row in measure_budget(model, args.methods, budget, images, labels, reference, base_macs, args)]
    rows.sort(key=lambda r: (-r["budget"], -r.get("top1", -1.0)))
    print(f"DeiT-Tiny, {len(labels)} images, unpatched top-1 {base.top1:.1f} / top-5 {base.top5:.1f}, "
          f"{base_macs / 1e9:.3f} GMACs; {time.time() - started:.0f} s, {torch.get_num_threads()} threads")
    print(format_table([r for r in rows if "top1" in r], COLUMNS, digits=3))
    for row in rows:
        if "unreachable" in row:
            print(f"not reachable: {row['method']} at {row['budget']}: {row['unreachable']}")
    if args.json:
        write_json({"model": "deit_tiny_patch16_224", "images": len(labels), "unpatched": {
            "top1": base.top1, "top5": base.top5, "gmacs": base_macs / 1e9}, "rows": rows}, args.json)
    if args.plot:
        pareto_plot(rows, base.top1, args.plot, len(labels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
