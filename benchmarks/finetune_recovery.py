"""How much of the training-free accuracy drop ``tokenpatch finetune``'s defaults win back (CPU, no labels used).

    python benchmarks/finetune_recovery.py --data ../shared/data --methods idle \\
        --json benchmarks/results/finetune_recovery.json

For each method: the real DeiT-Tiny, patched at ``--macs-ratio`` of its MACs (keep ratio fitted),
fine-tuned by :func:`tokenpatch.jobs.finetune.run_finetune_job` (what ``tokenpatch finetune``
runs) with its default recipe, on each half of the 500 shared images in turn (two folds: train
on one half, score on the other; labels are never read for training). Each row gives top-1 and
agreement with the unpatched model before (training-free) and after fine-tuning, the share of the
top-1 drop won back (``recovered``), the loop's images/s by phase and the job's wall time. The
pooled row scores every image once, by the model that did not train on it.

``--set KEY=VALUE`` changes a :class:`~tokenpatch.training.FinetuneConfig` field,
``--option KEY=VALUE`` a method option (both repeatable) and ``--batch-size`` the images per step:
for studies of the recipe. The output names every change; with none the rows are the defaults.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from tokenpatch.core.options import parse_options
from tokenpatch.core.registry import get_method
from tokenpatch.data import DEIT_TINY_WEIGHTS, IMAGENET_SAMPLE
from tokenpatch.jobs.finetune import FinetuneJob, run_finetune_job
from tokenpatch.measure.report import format_table, write_json
from tokenpatch.training import FinetuneConfig

from shared_data import add_data_option, shared_data

TRAINABLE = ("idle", "evit", "tome", "dynamicvit", "sait", "iared2")


def _pairs(texts: list[str]) -> list[tuple[str, str]]:
    return [(key, value) for key, _, value in (text.partition("=") for text in texts)]


def fold_row(method: str, fold: int, result: dict[str, Any], seconds: float) -> dict[str, Any]:
    """One table row from a job's result."""
    unpatched, before, after = (result[k]["top1"] for k in ("unpatched", "before", "after"))
    drop = unpatched - before
    return {"method": method, "fold": str(fold), "keep": result["keep_ratio"],
            "macs": result["macs"] / result["macs_unpatched"], "unpatched": unpatched,
            "free_top1": before, "free_agr": result["before"]["agreement"],
            "tuned_top1": after, "tuned_agr": result["after"]["agreement"],
            "recovered": (after - before) / drop if drop > 0 else float("nan"), "steps": result["steps"],
            **{k: result["loop"].get(f"{k}_img_s", float("nan")) for k in ("data", "teacher", "student", "loop")},
            "seconds": seconds}


def pooled_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Every image scored once, by the model that did not train on it (equal halves: the means)."""
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("unpatched", "free_top1", "free_agr", "tuned_top1",
                                                                "tuned_agr", "macs")}
    drop = mean["unpatched"] - mean["free_top1"]
    return {"method": rows[0]["method"], "fold": "pooled", **mean,
            "recovered": (mean["tuned_top1"] - mean["free_top1"]) / drop if drop > 0 else float("nan")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_option(parser)
    parser.add_argument("--methods", nargs="+", default=["idle"], choices=TRAINABLE)
    parser.add_argument("--macs-ratio", type=float, default=0.6, help="share of the unpatched MACs (default 0.6)")
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1], choices=[0, 1])
    parser.add_argument("--seed", type=int, default=0, help="seeds the halves, the shuffling and the training")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a FinetuneConfig field")
    parser.add_argument("--batch-size", type=int, default=FinetuneJob.batch_size)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a method option")
    parser.add_argument("--json", help="also write the rows and the jobs' results to this JSON file")
    args = parser.parse_args(argv)
    root = shared_data(parser, args)
    config = FinetuneConfig(**parse_options(FinetuneConfig, _pairs(args.set)))
    rows, results = [], []
    for method in args.methods:
        options = parse_options(get_method(method).config_class, _pairs(args.option))
        method_rows = []
        for fold in args.folds:
            started = time.time()
            result = run_finetune_job(FinetuneJob(
                model="deit_tiny_patch16_224", data=str(root / IMAGENET_SAMPLE), method=method, options=options,
                macs_ratio=args.macs_ratio, checkpoint=str(root / DEIT_TINY_WEIGHTS), val_fraction=0.5, fold=fold,
                batch_size=args.batch_size, seed=args.seed, config=config))
            method_rows.append(fold_row(method, fold, result, time.time() - started))
            results.append(result)
            print(format_table(method_rows[-1:], digits=3), flush=True)
        rows += method_rows + ([pooled_row(method_rows)] if len(method_rows) > 1 else [])
    changes = " ".join([f"--set {t}" for t in args.set] + [f"--option {t}" for t in args.option]
                       + ([f"--batch-size {args.batch_size}"] if args.batch_size != FinetuneJob.batch_size else []))
    print(f"\nDeiT-Tiny at {args.macs_ratio} of the MACs, seed {args.seed}, {changes or 'defaults'}; top-1 and agreement "
          "in %, data/teacher/student/loop in images/s, seconds per job")
    print(format_table(rows, digits=3))
    if args.json:
        write_json({"macs_ratio": args.macs_ratio, "seed": args.seed, "set": args.set, "option": args.option,
                    "rows": rows, "results": results}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
