"""Scoring without a class token: the mean patch query against the class token, on the real DeiT-Tiny.

    python benchmarks/class_free_scoring.py --data ../shared/data --json benchmarks/results/class_free_scoring.json

For every method that ranks patches by one query's attention (idle, evit, ats, sait), at matched
MACs (each scorer's keep ratio fitted to the same share of the unpatched MACs, fvcore), it
prints top-1, agreement with the unpatched model's top-1, and selection overlap: the share of
the patches the first reducing block keeps under ``scorer="mean_query"`` that it also keeps
under ``scorer="class_token"`` (same images; ``chance`` is the overlap of a random choice of
that size). The class token stays in the model (it still feeds the head); ``mean_query`` just
never reads it to score. All numbers come from this run.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import Tensor, nn

import tokenpatch
from tokenpatch.core.registry import get_method
from tokenpatch.measure.budget import mean_macs_per_image
from tokenpatch.measure.evaluate import accuracy, predict
from tokenpatch.measure.flops import count_macs

from real_data import add_real_data_flags, load_real_data, report, show_row

METHODS = ("idle", "evit", "ats", "sait")
SCORERS = ("class_token", "mean_query")


def first_selection(model: nn.Module, images: Tensor) -> list[set[int]]:
    """Per image, the patches (original positions) the first reducing block computed on."""
    with tokenpatch.trace(model) as recorded, torch.no_grad():
        model(images)
    record = next(r for r in recorded.records if r.mlp_tokens < recorded.input_tokens)
    counts = [len(row) for row in record.positions] if record.counts is None else record.counts.tolist()
    return [{int(p) for p in row[:count] if p >= 1} for row, count in zip(record.positions, counts)]


def overlap(chosen: list[set[int]], reference: list[set[int]]) -> float:
    """Mean share of ``chosen`` patches also in ``reference``, per image."""
    return sum(len(a & b) / max(1, len(a)) for a, b in zip(chosen, reference)) / len(chosen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_real_data_flags(parser)
    parser.add_argument("--macs-ratios", type=float, nargs="+", default=[0.55, 0.65])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--fit-images", type=int, default=8, help="images a per-image-count method's MACs are fitted on")
    args = parser.parse_args(argv)

    model, images, labels = load_real_data(parser, args)
    probe = images[:64]
    reference = predict(model, images, progress=True, desc="unpatched")
    base_macs = count_macs(model).total
    base = accuracy(reference, labels, reference)
    rows = [dict(method="unpatched", scorer="-", macs_ratio=1.0, keep_ratio=1.0, top1=base.top1,
                 agreement=base.agreement, top1_drop=0.0, overlap=1.0, chance=1.0)]
    started = time.time()
    for method in args.methods:
        for target in args.macs_ratios:
            selections = {}
            for scorer in SCORERS:
                # counts that follow the image (ats) are fitted on a few images, fixed ones on one
                chosen = get_method(method)
                fixed = chosen.fixed_token_counts(chosen.config_class())
                fit_on = probe[:1] if fixed else probe[:args.fit_images]
                tokenpatch.patch(model, method, macs_ratio=target, macs_input=fit_on, scorer=scorer)
                selections[scorer] = first_selection(model, probe)
                result = accuracy(predict(model, images, progress=True, desc=f"{method} {scorer} {target}"), labels,
                                  reference)
                kept = sum(len(s) for s in selections[scorer]) / len(probe)
                rows.append(dict(method=method, scorer=scorer,
                                 macs_ratio=mean_macs_per_image(model, fit_on) / base_macs, keep_ratio=tokenpatch.get_config(model).keep_ratio, top1=result.top1,
                                 agreement=result.agreement, top1_drop=base.top1 - result.top1,
                                 overlap=overlap(selections[scorer], selections["class_token"]),
                                 chance=kept / (images.shape[-1] // 16) ** 2))
                show_row(rows)
                tokenpatch.unpatch(model)
    report(f"DeiT-Tiny, {len(labels)} images (selection overlap on the first {len(probe)}), "
           f"{time.time() - started:.0f} s", rows, args, images=len(labels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
