"""Where a patched forward spends its time, next to the unpatched one: ``torch.profiler`` by op kind.

    python benchmarks/profile_breakdown.py --model deit_small_patch16_224 --methods idle tome evit \\
        --macs-ratio 0.65 --batch-size 1 --json benchmarks/results/profile_b1.json

Each model (the unpatched one first, then each method fitted to ``--macs-ratio`` of its MACs)
is profiled one forward at a time, alternating between the models for ``--rounds`` rounds
after a warm-up, so machine noise falls on all of them alike. Every op's self time is put in a
kind (matrix products, attention, convolution, elementwise and normalisation, token movement:
gather/scatter/index/sort/top-k/cat/copy, everything else: views, allocation and dispatch) and
reported in milliseconds per forward; ``--top`` also lists the slowest single ops per model.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections import defaultdict

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import tokenpatch
from tokenpatch.jobs.evaluation import MethodSpec
from tokenpatch.measure.report import format_table, write_json

KINDS = {
    "matmul": ("addmm", "mm", "bmm", "baddbmm", "matmul", "linear", "_int_mm"),
    "attention": ("_scaled_dot_product", "scaled_dot_product", "softmax", "_softmax"),
    "conv": ("convolution", "_convolution", "mkldnn_convolution", "conv2d", "cudnn_convolution"),
    "elementwise": ("gelu", "add", "add_", "mul", "mul_", "div", "div_", "sub", "layer_norm", "native_layer_norm",
                    "exp", "sum", "mean", "max", "amax", "clamp", "neg", "elu", "norm", "linalg_vector_norm",
                    "sqrt", "rsqrt", "pow", "var", "std"),
    "tokens": ("gather", "scatter", "scatter_", "scatter_add", "scatter_add_", "scatter_reduce", "index_select",
               "index", "index_put_", "index_copy", "index_copy_", "index_add_", "topk", "sort", "argsort",
               "cat", "copy_", "clone", "contiguous", "masked_fill", "masked_fill_", "where", "take_along_dim",
               "arange", "cumsum", "searchsorted"),
}
KIND_OF = {op: kind for kind, ops in KINDS.items() for op in ops}


def kind_of(name: str) -> str:
    """The kind of a profiled op such as ``aten::addmm``."""
    op = name.split("::")[-1]
    for prefix in ("_scaled_dot_product", "scaled_dot_product"):
        if op.startswith(prefix):
            return "attention"
    return KIND_OF.get(op, "other")


def profile_models(models: dict[str, torch.nn.Module], x: torch.Tensor, rounds: int, warmup: int
                   ) -> dict[str, dict[str, float]]:
    """Mean self CPU milliseconds per forward of every op, per model."""
    totals: dict[str, dict[str, float]] = {name: defaultdict(float) for name in models}
    with torch.inference_mode():
        for _ in range(warmup):
            for model in models.values():
                model(x)
        for _ in range(rounds):
            for name, model in models.items():
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    model(x)
                for event in prof.key_averages():
                    totals[name][event.key] += event.self_cpu_time_total / 1000.0 / rounds
    return totals


def breakdown_rows(totals: dict[str, dict[str, float]]) -> list[dict]:
    """One row per model: milliseconds per forward by kind, and the total."""
    rows = []
    for name, ops in totals.items():
        row: dict = {"model": name, **{kind: 0.0 for kind in [*KINDS, "other"]}}
        for op, ms in ops.items():
            row[kind_of(op)] += ms
        row["total_ms"] = sum(ops.values())
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--methods", nargs="+", default=["idle", "tome", "evit"],
                        help="METHOD or METHOD:KEY=VALUE,...")
    parser.add_argument("--macs-ratio", type=float, default=0.65)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=0, help="also list this many slowest ops per model")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False).eval()
    models = {"unpatched": base}
    for spec in map(MethodSpec.parse, args.methods):
        models[spec.label] = tokenpatch.patch(copy.deepcopy(base), spec.name, macs_ratio=args.macs_ratio,
                                              **spec.options)
    x = torch.randn(args.batch_size, 3, *base.patch_embed.img_size)
    totals = profile_models(models, x, args.rounds, args.warmup)
    rows = breakdown_rows(totals)
    print(f"{args.model}, batch {args.batch_size}, {args.macs_ratio:.0%} of the MACs, threads={torch.get_num_threads()}, "
          f"{args.rounds} rounds: self CPU ms per forward by op kind")
    print(format_table(rows, digits=2))
    for name, ops in totals.items() if args.top else ():
        slowest = sorted(ops.items(), key=lambda item: -item[1])[: args.top]
        print(f"\n{name}\n" + format_table([{"op": op, "kind": kind_of(op), "ms": ms} for op, ms in slowest], digits=3))
    if args.json:
        write_json({"rows": rows, "ops": totals, "batch_size": args.batch_size, "macs_ratio": args.macs_ratio,
                    "threads": torch.get_num_threads()}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
