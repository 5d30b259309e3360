"""Command line: ``tokenpatch audit MODEL`` measures what a patch buys (MACs and throughput)."""

from __future__ import annotations

import argparse
import copy
import json
import sys
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .api import available_methods, patch
from .errors import TokenPatchError
from .flops import count_macs
from .models import build_model, image_size, load_checkpoint
from .report import format_table
from .speed import compare_throughput, paired_speedup

AUDIT_COLUMNS = ["method", "keep_ratio", "gmacs_unpatched", "gmacs", "reduction_%", "ideal_speedup",
                 "img_s_unpatched", "img_s", "speedup"]


def audit_rows(model: nn.Module, methods: Sequence[str], keep_ratio: float, batch_size: int,
               repeats: int, device: str) -> list[dict[str, Any]]:
    """One row per method: MACs and measured throughput against the unpatched ``model``."""
    size = image_size(model)
    shape = (1, 3, *size)
    base_macs = count_macs(model, shape).total
    patched = {m: patch(copy.deepcopy(model), m, keep_ratio=keep_ratio) for m in methods}
    macs = {m: count_macs(p, shape).total for m, p in patched.items()}
    timings = compare_throughput({"unpatched": model, **patched}, batch_size, size, repeats=repeats, device=device)
    params = sum(p.numel() for p in model.parameters())
    return [
        {
            "method": m, "keep_ratio": keep_ratio, "params": params,
            "macs": macs[m], "macs_unpatched": base_macs,
            "gmacs": macs[m] / 1e9, "gmacs_unpatched": base_macs / 1e9,
            "reduction": 1.0 - macs[m] / base_macs, "reduction_%": 100.0 * (1.0 - macs[m] / base_macs),
            "ideal_speedup": base_macs / macs[m],
            "throughput": timings[m].median, "throughput_unpatched": timings["unpatched"].median,
            "img_s": timings[m].median, "img_s_unpatched": timings["unpatched"].median,
            "speedup": paired_speedup(timings[m], timings["unpatched"]),
        }
        for m in methods
    ]


def _audit(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise TokenPatchError("--device cuda was asked for, but torch sees no CUDA device")
    methods = sorted(available_methods()) if args.methods == "all" else [args.method]
    model = build_model(args.model, args.img_size)
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
    rows = audit_rows(model, methods, args.keep_ratio, args.batch_size, args.repeats, args.device)
    header = {"model": args.model, "batch_size": args.batch_size, "device": args.device}
    if args.json:
        payload = {**header, **rows[0]} if len(rows) == 1 else {**header, "results": rows}
        json.dump(payload, sys.stdout, indent=2)
        print()
    else:
        print(f"{args.model}: {rows[0]['params'] / 1e6:.2f} M params, batch {args.batch_size}, {args.device}, "
              f"{torch.get_num_threads()} threads")
        print(format_table(rows, AUDIT_COLUMNS, digits=2))
    return 0


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"keep ratio must be a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"keep ratio must be in (0, 1], got {value}")
    return value


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenpatch", description="Token reduction for pretrained ViTs.")
    commands = parser.add_subparsers(dest="command", required=True)
    audit = commands.add_parser("audit", help="MACs and throughput of a patched timm model vs the unpatched one")
    audit.add_argument("model", help="timm model name, e.g. deit_small_patch16_224, or hf:NAME for its transformers "
                       "ViT/DeiT twin (random weights)")
    audit.add_argument("--method", default="idle", choices=sorted(available_methods()))
    audit.add_argument("--methods", choices=["all"], help="one row per available method")
    audit.add_argument("--keep-ratio", type=_ratio, default=0.5)
    audit.add_argument("--batch-size", type=_positive, default=32)
    audit.add_argument("--img-size", type=_positive, help="input size (default: the model's)")
    audit.add_argument("--checkpoint", help="state_dict file (.safetensors or torch) to load")
    audit.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    audit.add_argument("--repeats", type=_positive, default=10, help="timed rounds (median reported)")
    audit.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    audit.set_defaults(run=_audit)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``tokenpatch`` command."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (TokenPatchError, FileNotFoundError, RuntimeError) as exc:
        message = " ".join(str(exc).split())  # one line, even for torch's multi-line load errors
        print(f"tokenpatch: error: {message[:500]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
