"""Measured vs ideal speed-up of patched models (random weights; speed does not depend on them).

    python benchmarks/throughput.py --model deit_small_patch16_224 --method idle --keep-ratios 0.5 \\
        --batch-sizes 1 32 --json benchmarks/results/throughput.json

For each batch size, the unpatched model and each patched copy are timed alternately in this
process (warm-up, then ``--repeats`` rounds). ``ideal`` is unpatched MACs / patched MACs;
``speedup`` is the median over rounds of the paired throughput ratio; ``efficiency`` is
speedup / ideal.
"""

from __future__ import annotations

import argparse
import copy
import sys

import timm
import torch

import tokenpatch
from tokenpatch.measure.flops import count_macs
from tokenpatch.measure.report import format_table, write_json
from tokenpatch.measure.speed import compare_throughput, paired_speedup


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--method", nargs="+", default=["idle"])
    parser.add_argument("--keep-ratios", type=float, nargs="+", default=[0.5])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    base = timm.create_model(args.model, pretrained=False).eval()
    size = base.patch_embed.img_size
    base_macs = count_macs(base, (1, 3, *size)).total
    models = {"unpatched": base}
    ideal = {}
    for method in args.method:
        for ratio in args.keep_ratios:
            name = f"{method}@{ratio}"
            models[name] = tokenpatch.patch(copy.deepcopy(base), method, keep_ratio=ratio)
            ideal[name] = base_macs / count_macs(models[name], (1, 3, *size)).total
    rows = []
    for batch in args.batch_sizes:
        timings = compare_throughput(models, batch, size, repeats=args.repeats, warmup=args.warmup,
                                     device=args.device, dtype=None if dtype == torch.float32 else dtype)
        for name in ideal:
            speedup = paired_speedup(timings[name], timings["unpatched"])
            rows.append(dict(model=args.model, config=name, device=args.device, dtype=args.dtype, batch=batch,
                             unpatched_img_s=timings["unpatched"].median, patched_img_s=timings[name].median,
                             ideal=ideal[name], speedup=speedup, efficiency=speedup / ideal[name]))
    print(f"threads={torch.get_num_threads()} repeats={args.repeats}")
    print(format_table(rows, digits=3))
    if args.json:
        write_json({"rows": rows, "threads": torch.get_num_threads(), "repeats": args.repeats}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
