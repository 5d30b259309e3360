"""What each method's token bookkeeping costs per forward, where arithmetic is nearly free.

    python benchmarks/bookkeeping.py --methods idle tome evit pitome ppt --repeats 60

A 12-block ViT only 48 wide (3 heads) on 224x224 images (197 tokens) runs its matrix products in
microseconds, so a batch-1 forward is mostly the fixed cost of its ops and of the Python around
them: what a method adds to that (scoring, top-k, gathers, merges, write-backs, the engine's own
calls) shows as extra milliseconds per forward. Each method runs at its default options and
keep ratio; the unpatched model and the patched copies are timed alternately in one process
(medians). ``extra_ms`` = patched - unpatched per forward (the patched model also computes on
fewer tokens, which here saves almost nothing). On DeiT-S the same ops cost about the same, so
``extra_ms`` is roughly the time a method needs beyond its arithmetic there.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from timm.models.vision_transformer import VisionTransformer

import tokenpatch
from tokenpatch.jobs.evaluation import MethodSpec
from tokenpatch.measure.report import format_table, write_json
from tokenpatch.measure.speed import compare_throughput

COLUMNS = ["method", "unpatched_ms", "patched_ms", "extra_ms"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=sorted(tokenpatch.available_methods()),
                        help="METHOD or METHOD:KEY=VALUE,... (default: every registered method)")
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = VisionTransformer(embed_dim=48, num_heads=3, depth=12).eval()
    models = {"unpatched": base}
    for spec in map(MethodSpec.parse, args.methods):
        models[spec.label] = tokenpatch.patch(copy.deepcopy(base), spec.name, **spec.options)
    timings = compare_throughput(models, batch_size=1, repeats=args.repeats, warmup=args.warmup)
    ms = {name: 1e3 / timing.median for name, timing in timings.items()}  # batch 1: ms per forward
    rows = [dict(method=name, unpatched_ms=ms["unpatched"], patched_ms=ms[name], extra_ms=ms[name] - ms["unpatched"])
            for name in models if name != "unpatched"]
    print(f"48-wide 12-block ViT, 197 tokens, batch 1, threads={torch.get_num_threads()}, repeats={args.repeats}")
    print(format_table(rows, COLUMNS, digits=2))
    if args.json:
        write_json({"rows": rows, "threads": torch.get_num_threads(), "repeats": args.repeats,
                    "torch": torch.__version__}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
