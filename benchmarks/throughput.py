"""Measured vs ideal speed-up of every method at one MAC budget, eager and compiled (random weights).

    python benchmarks/throughput.py --model deit_small_patch16_224 --macs-ratio 0.65 --batch-sizes 1 32 \\
        --modes eager compiled --json benchmarks/results/throughput.json

Each method (default: every registered one, with its default options; ``NAME:KEY=VALUE,...``
for others) is fitted to ``--macs-ratio`` of the unpatched MACs (methods that cannot reach it
get their nearest budget, shown in ``macs_ratio``). For each batch size and mode the unpatched
model and the patched copies are timed alternately in this process (warm-up, then
``--repeats`` rounds): ``ideal`` is unpatched MACs / patched MACs (per image, counted on the
timed images), ``speedup`` the median over rounds of the paired throughput ratio,
``efficiency`` = speedup / ideal; ``unpatched_ms`` and ``patched_ms`` are the median milliseconds
per forward (at batch 1, the latency). ``compiled`` wraps every model, the unpatched one included,
in ``torch.compile`` (default inductor backend) and compares compiled with compiled;
``cudagraphs`` (``--device cuda`` only) compiles with ``mode="reduce-overhead"``, which replays
each static-shape graph as one CUDA graph (no per-kernel launch cost: what batch 1 needs).

The row ``fewer tokens`` is the unpatched model run on a smaller image, with about the
same MACs as the budget (the image size whose MACs are nearest): every block computes on fewer
tokens with no token bookkeeping at all, so its efficiency shows what the hardware gives for
fewer rows per matrix product, the ceiling a token-reduction method works under.

``--replay`` adds, for each method, the unpatched model replaying that method's schedule: block
i runs its own forward on the first n_i tokens, n_i being the tokens the method's block i ran its
MLP on (from a trace), with no scoring, gathering, merging or writing back. Its efficiency is
the ceiling of that schedule on this hardware; the gap to the method's is the method's own
overhead.

``--device cuda --dtype float16`` measures on a GPU (CUDA events); the timing code is the same.
``--key-bias mask`` hands proportional attention's log-size bias (``tome``, ``ppt``) to SDPA as a
mask instead of folding it into the heads (``fold``: the default on CUDA, where the flash kernel
takes no mask), so the two exact forms can be timed against each other.
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from typing import Any

import timm
import torch
from torch import nn

import tokenpatch
from tokenpatch.core import pieces
from tokenpatch.errors import InvalidOptionError
from tokenpatch.jobs.evaluation import MethodSpec
from tokenpatch.measure.budget import mean_macs_per_image
from tokenpatch.measure.flops import mac_analysis
from tokenpatch.measure.report import device_name, format_table, write_json
from tokenpatch.measure.speed import compare_throughput, paired_speedup

COLUMNS = ["method", "mode", "batch", "macs_ratio", "unpatched_img_s", "patched_img_s", "unpatched_ms", "patched_ms",
           "ideal", "speedup", "efficiency", "note"]
REFERENCE = "fewer tokens"
#: how each ``--modes`` entry wraps a model before timing
COMPILERS = {"eager": lambda m: m, "compiled": torch.compile,
             "cudagraphs": lambda m: torch.compile(m, mode="reduce-overhead")}


def fit(base: nn.Module, spec: MethodSpec, macs_ratio: float, images: torch.Tensor) -> nn.Module:
    """A patched copy of ``base`` at ``macs_ratio`` of its MACs, or at the nearest share the method reaches."""
    model = tokenpatch.patch(copy.deepcopy(base), spec.name, **spec.options)
    try:
        tokenpatch.set_macs_ratio(model, macs_ratio, images)
    except InvalidOptionError:
        tokenpatch.set_macs_ratio(model, macs_ratio, images, tolerance=0.25)
    return model


def smaller_image_model(name: str, macs_ratio: float) -> tuple[nn.Module, int]:
    """The unpatched ``name`` at the square image size whose MACs share is nearest ``macs_ratio``."""
    base = timm.create_model(name, pretrained=False).eval()
    full, patch = base.patch_embed.img_size[0], base.patch_embed.patch_size[0]
    full_macs = mean_macs_per_image(base, torch.randn(1, 3, full, full))
    shares = {}
    for size in range(patch * 2, full, patch):
        model = timm.create_model(name, pretrained=False, img_size=size).eval()
        shares[size] = mean_macs_per_image(model, torch.randn(1, 3, size, size)) / full_macs
    size = min(shares, key=lambda s: abs(shares[s] - macs_ratio))
    # built again rather than keeping every candidate in memory
    return timm.create_model(name, pretrained=False, img_size=size).eval(), size


def timed_rows(models: dict[str, nn.Module], macs: dict[str, float], inputs: dict[str, torch.Tensor], batch: int,
               mode: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time ``models`` alternately (the unpatched one first) and return one row per non-unpatched model."""
    dtype = None if args.dtype == "float32" else getattr(torch, args.dtype)
    timed = {name: COMPILERS[mode](m) for name, m in models.items()}
    runners = {name: OwnInput(m, inputs[name][:batch]) for name, m in timed.items()}
    timings = compare_throughput(runners, batch, repeats=args.repeats, warmup=args.warmup, device=args.device,
                                 dtype=dtype, inputs=torch.zeros(batch, 1))
    rows = []
    for name in models:
        if name == "unpatched":
            continue
        speedup, ideal = paired_speedup(timings[name], timings["unpatched"]), macs["unpatched"] / macs[name]
        rows.append(dict(method=name, mode=mode, batch=batch, macs_ratio=macs[name] / macs["unpatched"],
                         unpatched_img_s=timings["unpatched"].median, patched_img_s=timings[name].median,
                         unpatched_ms=1000.0 * batch / timings["unpatched"].median,
                         patched_ms=1000.0 * batch / timings[name].median, ideal=ideal,
                         speedup=speedup, efficiency=speedup / ideal, note=""))
    return rows


class ScheduleReplay(nn.Module):
    """An unpatched timm ViT whose block i runs on its first ``counts[i]`` tokens (a schedule, no bookkeeping)."""

    def __init__(self, model: nn.Module, counts: list[int]) -> None:
        super().__init__()
        self.model, self.counts = model, counts

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        model = self.model
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        for block, count in zip(model.blocks, self.counts):
            x = block(x[:, :count])
        return model.forward_head(model.norm(x))


def replay_macs(replay: ScheduleReplay, images: torch.Tensor) -> float:
    """MACs per image of a replay, counted as :func:`~tokenpatch.measure.flops.count_macs` counts them."""
    with torch.no_grad():
        return float(mac_analysis(replay, images[:1])[0].total())


def replay_of(base: nn.Module, patched: nn.Module, images: torch.Tensor) -> ScheduleReplay:
    """The :class:`ScheduleReplay` of ``patched``'s per-block MLP token counts on ``images``."""
    with torch.inference_mode(), tokenpatch.trace(patched) as recorded:
        patched(images)
    return ScheduleReplay(base, [record.mlp_tokens for record in recorded.records])


class OwnInput(nn.Module):
    """Runs ``model`` on its own (B, 3, H, W) ``images`` whatever it is called with, so that models
    with different input sizes share the alternating timer (the images move with ``.to()``)."""

    def __init__(self, model: nn.Module, images: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("images", images)

    def forward(self, _: torch.Tensor) -> torch.Tensor:
        return self.model(self.images)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--methods", nargs="+", default=sorted(tokenpatch.available_methods()),
                        help="METHOD or METHOD:KEY=VALUE,... (default: every registered method)")
    parser.add_argument("--macs-ratio", type=float, default=0.65)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--modes", nargs="+", choices=sorted(COMPILERS), default=["eager"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--replay", action="store_true", help="add each method's schedule replayed without bookkeeping")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--key-bias", choices=["fold", "mask"],
                        help="how attention gets a key bias (default: tokenpatch's choice for the device)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here")
    if args.key_bias is not None:
        pieces.FOLD_KEY_BIAS_ON = frozenset({torch.device(args.device).type}) if args.key_bias == "fold" else frozenset()
    if "cudagraphs" in args.modes and not args.device.startswith("cuda"):
        parser.error("--modes cudagraphs needs --device cuda (CUDA graphs exist only on a GPU)")

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", module="torch._dynamo")
    base = timm.create_model(args.model, pretrained=False).eval()
    size = base.patch_embed.img_size
    images = torch.randn(max(args.batch_sizes), 3, *size)
    models: dict[str, nn.Module] = {"unpatched": base}
    for spec in map(MethodSpec.parse, args.methods):
        models[spec.label] = fit(base, spec, args.macs_ratio, images[:8])
    if args.replay:
        for name in [n for n in models if n != "unpatched"]:
            models[f"{name} (replay)"] = replay_of(base, models[name], images[:1])
    models[REFERENCE], small = smaller_image_model(args.model, args.macs_ratio)
    inputs = {name: images for name in models}
    inputs[REFERENCE] = torch.randn(len(images), 3, small, small)
    macs = {name: replay_macs(m, images) if isinstance(m, ScheduleReplay) else mean_macs_per_image(m, inputs[name][:8])
            for name, m in models.items()}
    rows = []
    for mode in args.modes:
        for batch in args.batch_sizes:
            rows += timed_rows(models, macs, inputs, batch, mode, args)
    for row in rows:
        if row["method"] == REFERENCE:
            row["note"] = f"unpatched at {small}x{small}"
    print(f"{args.model}, {args.device} {args.dtype}, threads={torch.get_num_threads()}, repeats={args.repeats}")
    print(format_table(rows, COLUMNS, digits=3))
    if args.json:
        write_json({"command": " ".join(sys.argv), "rows": rows, "model": args.model, "device": args.device,
                    "device_name": device_name(args.device), "dtype": args.dtype,
                    "key_bias_folded_on": sorted(pieces.FOLD_KEY_BIAS_ON),
                    "threads": torch.get_num_threads(), "repeats": args.repeats, "torch": torch.__version__}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
