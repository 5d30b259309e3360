"""Command line: ``tokenpatch audit MODEL`` measures what a patch buys (MACs and throughput);
``tokenpatch finetune MODEL --data DIR`` self-distils a patched model (also under ``torchrun``)."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .api import available_methods, get_config, get_method_name, patch, set_keep_ratio, set_options
from .budget import check_macs_ratio
from .errors import TokenPatchError
from .flops import count_macs
from .methods.base import check_keep_ratio
from .models import build_model, image_size, load_checkpoint
from .report import format_table
from .speed import compare_throughput, paired_speedup

AUDIT_COLUMNS = ["method", "keep_ratio", "gmacs_unpatched", "gmacs", "reduction_%", "ideal_speedup",
                 "img_s_unpatched", "img_s", "speedup"]


def audit_rows(model: nn.Module, methods: Sequence[str], keep_ratio: Optional[float], batch_size: int,
               repeats: int, device: str, options: Optional[dict[str, Any]] = None,
               macs_ratio: Optional[float] = None) -> list[dict[str, Any]]:
    """One row per method: MACs and measured throughput against the unpatched ``model``.

    With ``macs_ratio`` each method's keep ratio is solved for that share of the unpatched MACs.
    """
    size = image_size(model)
    shape = (1, 3, *size)
    base_macs = count_macs(model, shape).total
    patched = {m: patch(copy.deepcopy(model), m, keep_ratio=keep_ratio, macs_ratio=macs_ratio, **(options or {}))
               for m in methods}
    macs = {m: count_macs(p, shape).total for m, p in patched.items()}
    timings = compare_throughput({"unpatched": model, **patched}, batch_size, size, repeats=repeats, device=device)
    params = sum(p.numel() for p in model.parameters())
    return [
        {
            "method": m, "keep_ratio": get_config(patched[m]).keep_ratio, "params": params,
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


def _print_json(payload: dict[str, Any]) -> None:
    json.dump(payload, sys.stdout, indent=2)
    print()


def _audit(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise TokenPatchError("--device cuda was asked for, but torch sees no CUDA device")
    methods = sorted(available_methods()) if args.methods == "all" else [args.method]
    model = build_model(args.model, args.img_size)
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
    keep_ratio = None if args.macs_ratio is not None else args.keep_ratio
    rows = audit_rows(model, methods, keep_ratio, args.batch_size, args.repeats, args.device, dict(args.option),
                      args.macs_ratio)
    header = {"model": args.model, "batch_size": args.batch_size, "device": args.device}
    if args.json:
        _print_json({**header, **rows[0]} if len(rows) == 1 else {**header, "results": rows})
    else:
        print(f"{args.model}: {rows[0]['params'] / 1e6:.2f} M params, batch {args.batch_size}, {args.device}, "
              f"{torch.get_num_threads()} threads")
        print(format_table(rows, AUDIT_COLUMNS, digits=2))
    return 0


def finetune_result(args: argparse.Namespace) -> dict[str, Any]:
    """Run the ``finetune`` command's job and return its result (scores before/after, MACs, sizes)."""
    from . import finetune_job
    from .checkpoint import save
    from .train import FinetuneConfig, world_size

    finetune_job.init_distributed()
    torch.manual_seed(args.seed)
    model = build_model(args.model)
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
    options = dict(args.option)
    patch(model, args.method, keep_ratio=args.keep_ratio, **options)
    train, val = finetune_job.split_dataset(args.model, args.data, args.labels, args.val_fraction, args.seed, args.augment)
    config = FinetuneConfig(steps=args.steps, lr=args.lr, label_weight=args.label_weight, eval_every=args.eval_every,
                            module_lr=args.module_lr, ratio_weight=args.ratio_weight, cut_weight=args.cut_weight,
                            feature_weight=args.feature_weight, temperature=args.temperature,
                            kept_penalty=args.kept_penalty, train_backbone=not args.freeze_backbone,
                            mixup=args.mixup)
    result = finetune_job.run(model, train, finetune_job.held_out(model, val), config, args.batch_size, args.seed)
    if args.out and finetune_job.is_main_process():
        save(model, args.out)
    return {"model": args.model, "method": args.method, "keep_ratio": args.keep_ratio, "options": options,
            "world_size": world_size(), "augment": args.augment, "finetune_config": dataclasses.asdict(config),
            **result, "out": args.out}


def _finetune(args: argparse.Namespace) -> int:
    from .train import is_main_process

    result = finetune_result(args)
    if not is_main_process():
        return 0
    if args.json:
        _print_json(result)
    else:
        rows = [{"": when, **result[when]} for when in ("unpatched", "before", "after")]
        print(f"{args.model} {args.method}@{args.keep_ratio}: {result['macs'] / 1e9:.2f} of "
              f"{result['macs_unpatched'] / 1e9:.2f} GMACs, {args.steps} steps on {result['train_images']} images, "
              f"validated on {result['val_images']}")
        print(format_table(rows, digits=2))
    return 0


def patched_from_arguments(args: argparse.Namespace) -> nn.Module:
    """The model of ``args``, patched: from a ``tokenpatch.save`` checkpoint (its method and options,
    changed by any ``--keep-ratio``/``--option`` given), or plain weights patched with ``--method``."""
    from .checkpoint import is_checkpoint, load

    model = build_model(args.model)
    if not (args.checkpoint and is_checkpoint(args.checkpoint)):
        if args.checkpoint:
            load_checkpoint(model, args.checkpoint)
        return patch(model, args.method or "idle", keep_ratio=args.keep_ratio or 0.5, **dict(args.option))
    load(model, args.checkpoint)
    if args.method not in (None, get_method_name(model)):
        raise TokenPatchError(f"{args.checkpoint} holds a {get_method_name(model)!r} model; drop --method {args.method} "
                              f"or give plain weights")
    if args.keep_ratio is not None:
        set_keep_ratio(model, args.keep_ratio)
    set_options(model, **dict(args.option))
    return model


def _explain(args: argparse.Namespace) -> int:
    from .explain_job import write_explanations

    model = patched_from_arguments(args)
    result = write_explanations(model, args.images, args.model, args.out)
    if args.json:
        options = get_config(model).to_dict()
        _print_json({"model": args.model, "method": get_method_name(model), "options": options, **result})
    else:
        what = "patch tokens per block (merged ones count once)" if result["merged"] else "patches computed per block"
        for image, counts in zip(result["images"], result["patches_per_block"]):
            print(f"{image}: {what} {counts}")
        print(f"wrote {len(result['files'])} overlays and {result['contact_sheet']}")
    return 0


def _ratio_argument(check: Callable[[Any], float], what: str) -> Callable[[str], float]:
    """An argparse ``type`` reading a number in (0, 1] through ``check``; ``what`` names it in errors."""
    def parse(text: str) -> float:
        try:
            return check(float(text))
        except ValueError as exc:  # not a number, or outside (0, 1] (InvalidOptionError is a ValueError)
            raise argparse.ArgumentTypeError(f"{what} must be a number in (0, 1], got {text!r}") from exc

    return parse


_ratio = _ratio_argument(check_keep_ratio, "keep ratio")
_macs_ratio = _ratio_argument(check_macs_ratio, "macs ratio")


def _option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as JSON when it parses (numbers, true/false, null, lists), else text."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, e.g. mass=0.9, got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key, tuple(parsed) if isinstance(parsed, list) else parsed


def _add_method_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="idle", choices=sorted(available_methods()))
    parser.add_argument("--keep-ratio", type=_ratio, default=0.5)
    parser.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                        help="a method option, e.g. --option mass=0.9 (sait) or --option schedule=geometric (idle); repeatable")


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
    _add_method_arguments(audit)
    audit.add_argument("--macs-ratio", type=_macs_ratio, help="instead of --keep-ratio: the share of the unpatched "
                       "MACs to spend; each method's keep ratio is solved to within 1 %% of it")
    audit.add_argument("--methods", choices=["all"], help="one row per available method")
    audit.add_argument("--batch-size", type=_positive, default=32)
    audit.add_argument("--img-size", type=_positive, help="input size (default: the model's)")
    audit.add_argument("--checkpoint", help="state_dict file (.safetensors or torch) to load")
    audit.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    audit.add_argument("--repeats", type=_positive, default=10, help="timed rounds (median reported)")
    audit.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    audit.set_defaults(run=_audit)

    tune = commands.add_parser("finetune", help="self-distil a patched model from its unpatched weights on an image folder")
    tune.add_argument("model", help="timm model name or hf:NAME (weights from --checkpoint)")
    _add_method_arguments(tune)
    tune.add_argument("--data", required=True, help="image folder: flat, class sub-folders, or flat with labels.csv")
    tune.add_argument("--labels", help="file,class_index CSV (default: DATA/labels.csv when present)")
    tune.add_argument("--checkpoint", help="weights of the unpatched model (.safetensors or torch state dict)")
    tune.add_argument("--steps", type=_positive, default=100)
    tune.add_argument("--batch-size", type=_positive, default=16)
    tune.add_argument("--lr", type=float, default=2e-5)
    tune.add_argument("--label-weight", type=float, default=0.0, help="cross-entropy weight when labels exist")
    tune.add_argument("--module-lr", type=float, default=1e-3, help="learning rate of a method's new modules (dynamicvit)")
    tune.add_argument("--ratio-weight", type=float, default=2.0, help="DynamicViT ratio-loss weight (dynamicvit)")
    tune.add_argument("--cut-weight", type=float, default=0.0, help="IdleViT token-cut loss weight (idle; 0: off)")
    tune.add_argument("--feature-weight", type=float, default=0.0,
                      help="weight of MSE between the student's and teacher's pooled features (0: off)")
    tune.add_argument("--kept-penalty", type=float, default=0.5,
                      help="iared2: reward given up per unit of kept token fraction (lambda)")
    tune.add_argument("--freeze-backbone", action="store_true",
                      help="train only the method's own modules (iared2's interpreters, dynamicvit's predictors)")
    tune.add_argument("--temperature", type=float, default=1.0, help="distillation temperature")
    tune.add_argument("--mixup", type=float, default=0.0,
                      help="mixup alpha for the training images (0: off; distillation only, no labels)")
    tune.add_argument("--augment", action="store_true", help="random resized crops and flips for the training images")
    tune.add_argument("--val-fraction", type=float, default=0.2, help="share of images held out for evaluation")
    tune.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: at the end)")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--out", help="save the fine-tuned patched model here (tokenpatch.save format)")
    tune.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    tune.set_defaults(run=_finetune)

    show = commands.add_parser("explain", help="PNG overlays of the patches a patched model computed, and its scores")
    show.add_argument("model", help="timm model name or hf:NAME (weights from --checkpoint)")
    show.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    _add_method_arguments(show)
    show.set_defaults(method=None, keep_ratio=None)  # a tokenpatch checkpoint brings its own
    show.add_argument("--checkpoint", help="weights: a state dict (then --method, default idle, and --keep-ratio, "
                      "default 0.5, apply), or a tokenpatch.save file (its method and options)")
    show.add_argument("--out", required=True, help="folder for the PNG files")
    show.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    show.set_defaults(run=_explain)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``tokenpatch`` command."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (TokenPatchError, FileNotFoundError, RuntimeError, ValueError) as exc:
        message = " ".join(str(exc).split())  # one line, even for torch's multi-line load errors
        print(f"tokenpatch: error: {message[:500]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
