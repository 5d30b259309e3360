"""Where a patched forward spends its time, next to the unpatched one: ``torch.profiler`` by op kind.

    python benchmarks/profile_breakdown.py --model deit_small_patch16_224 --methods idle tome evit \\
        --macs-ratio 0.65 --batch-size 1 --json benchmarks/results/profile_b1.json
    python benchmarks/profile_breakdown.py --device cuda --dtype float16 --batch-size 256 ...

Each model (the unpatched one first, then each method fitted to ``--macs-ratio`` of its MACs)
is profiled one forward at a time, alternating between the models for ``--rounds`` rounds
after a warm-up, so machine noise falls on all of them alike. Every op's self time (on the CPU;
on a GPU the time its kernels ran on the device) is put in a kind (matrix products, attention,
convolution, elementwise and normalisation, token movement: gather/scatter/index/sort/top-k/
cat/copy, everything else: views, allocation and dispatch) and reported in milliseconds per
forward. ``wall_ms`` is the forward's wall time (the device waited for) and ``gaps_ms`` what the
ops' times leave of it: on a GPU, the launch gaps in which no kernel runs. ``sdpa`` names the
attention kernels SDPA chose (flash, memory-efficient, cuDNN or math). ``--top`` also lists the
slowest single ops per model.
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
from tokenpatch.measure.report import device_name, format_table, write_json
from tokenpatch.measure.speed import time_forward

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


#: SDPA's kernels as the profiler names their ops, and what the table calls them
SDPA_KERNELS = {"_scaled_dot_product_flash_attention": "flash", "_scaled_dot_product_efficient_attention": "efficient",
                "_scaled_dot_product_cudnn_attention": "cudnn", "_scaled_dot_product_attention_math": "math"}


def sdpa_kernel(op: str) -> str | None:
    """The SDPA kernel an op name stands for (the CPU's flash kernel is ``flash``), or None."""
    name = op.split("::")[-1]
    return next((label for prefix, label in SDPA_KERNELS.items() if name.startswith(prefix)), None)


def profile_models(models: dict[str, torch.nn.Module], x: torch.Tensor, rounds: int, warmup: int
                   ) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Mean self milliseconds per forward of every op (device time on a GPU), per model, and each
    model's mean wall milliseconds per forward."""
    totals: dict[str, dict[str, float]] = {name: defaultdict(float) for name in models}
    walls: dict[str, float] = defaultdict(float)
    on_gpu = x.device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    with torch.inference_mode():
        for _ in range(warmup):
            for model in models.values():
                model(x)
        for _ in range(rounds):
            for name, model in models.items():
                with profile(activities=activities) as prof:
                    walls[name] += time_forward(model, x) * 1000.0 / rounds
                for event in prof.key_averages():
                    spent = event.self_device_time_total if on_gpu else event.self_cpu_time_total
                    if event.key.startswith("aten::") or not on_gpu:  # on a GPU: the ops, not their kernels
                        totals[name][event.key] += spent / 1000.0 / rounds
    return totals, walls


def breakdown_rows(totals: dict[str, dict[str, float]], walls: dict[str, float]) -> list[dict]:
    """One row per model: milliseconds per forward by kind, the total, the wall time, the gaps
    and the SDPA kernels that ran."""
    rows = []
    for name, ops in totals.items():
        row: dict = {"model": name, **{kind: 0.0 for kind in [*KINDS, "other"]}}
        for op, ms in ops.items():
            row[kind_of(op)] += ms
        row["total_ms"] = sum(ops.values())
        row["wall_ms"], row["gaps_ms"] = walls[name], max(0.0, walls[name] - row["total_ms"])
        row["sdpa"] = "+".join(sorted({kernel for op in ops if (kernel := sdpa_kernel(op))})) or "-"
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
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here")

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False).eval()
    models = {"unpatched": base}
    for spec in map(MethodSpec.parse, args.methods):
        models[spec.label] = tokenpatch.patch(copy.deepcopy(base), spec.name, macs_ratio=args.macs_ratio,
                                              **spec.options)
    dtype = getattr(torch, args.dtype)
    for model in models.values():
        model.to(device=args.device, dtype=dtype)
    x = torch.randn(args.batch_size, 3, *base.patch_embed.img_size, device=args.device, dtype=dtype)
    totals, walls = profile_models(models, x, args.rounds, args.warmup)
    rows = breakdown_rows(totals, walls)
    where = device_name(args.device)
    print(f"{args.model}, {where} {args.dtype}, batch {args.batch_size}, {args.macs_ratio:.0%} of the MACs, "
          f"threads={torch.get_num_threads()}, {args.rounds} rounds: ms per forward by op kind")
    print(format_table(rows, digits=2))
    for name, ops in totals.items() if args.top else ():
        slowest = sorted(ops.items(), key=lambda item: -item[1])[: args.top]
        print(f"\n{name}\n" + format_table([{"op": op, "kind": kind_of(op), "ms": ms} for op, ms in slowest], digits=3))
    if args.json:
        write_json({"command": " ".join(sys.argv), "rows": rows, "ops": totals, "model": args.model, "device": where,
                    "dtype": args.dtype, "batch_size": args.batch_size, "macs_ratio": args.macs_ratio,
                    "threads": torch.get_num_threads(), "torch": torch.__version__}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
