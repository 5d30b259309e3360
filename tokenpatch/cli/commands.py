"""The ``tokenpatch`` commands: their arguments, and the calls into :mod:`tokenpatch.jobs` that run them."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import shlex
import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils.data import Dataset, Subset

from ..api import available_methods, get_config, get_method_name, set_options
from ..checkpoint import saved_config
from ..core.method import check_keep_ratio
from ..core.options import first_repeated, parse_options
from ..core.registry import DEFAULT_METHOD, get_method, training_free_methods
from ..core.distributed import is_main_process, join_process_group, world_size
from ..data import TRAINING_AUGMENTATIONS, image_dataset, input_transform, load_images
from ..errors import TokenPatchError, UnreachableBudgetError
from ..jobs.audit import AUDIT_COLUMNS, COMPILED_COLUMNS, audit_rows
from ..jobs.evaluation import EVAL_COLUMNS, MAC_IMAGES, MethodSpec, classes_of, eval_loader, evaluation_rows
from ..jobs.explain import write_explanations
from ..jobs.finetune import FinetuneJob, finetune_job, run_finetune_job
from ..jobs.models import DEFAULT_KEEP_RATIO, DEFAULT_MACS_RATIO, LoadedModel, PatchRequest, lift_keep_ratio, load_model
from ..measure.budget import check_macs_ratio
from ..measure.report import RESULTS_SCHEMA_VERSION, format_table, write_results
from ..measure.runtime import AMP_DTYPES, Runtime
from ..training.finetune import FinetuneConfig
from ..progress import silenced_progress
from ..training.recipes import RECIPES, recipe_named
from .parser import COMMANDS, top_level_parser

#: the ``--methods`` value that names every registered method
ALL_METHODS = "all"


def _print_json(payload: dict[str, Any]) -> None:
    """A command's ``--json`` output: the layout of ``results.json`` (its ``schema_version`` first), without ``versions``."""
    json.dump({"schema_version": RESULTS_SCHEMA_VERSION, **payload}, sys.stdout, indent=2)
    print()


def _runtime(args: argparse.Namespace) -> Runtime:
    return Runtime.named(args.device, args.amp, args.channels_last)


def _load(args: argparse.Namespace, img_size: Optional[int] = None) -> LoadedModel:
    return load_model(args.model, args.checkpoint, img_size, pretrained=not args.no_pretrained)


def _header(args: argparse.Namespace, loaded: LoadedModel, runtime: Runtime) -> dict[str, Any]:
    """What every results file and JSON output starts with: the command, the model and its weights, the device."""
    return {"command": shlex.join(["tokenpatch", *args.argv]), "model": args.model, "weights": loaded.weights,
            "device": runtime.describe()}


def _write_results(args: argparse.Namespace, header: dict[str, Any], rows: list[dict[str, Any]],
                   columns: Sequence[str]) -> None:
    if args.output:
        write_results(args.output, header, rows, columns)


def _audit(args: argparse.Namespace) -> int:
    runtime = _runtime(args)
    specs = _listed_methods(args.methods)
    if specs and (args.method or args.option):
        raise TokenPatchError("give --method (with --option) for one method, or --methods with each one's options")
    options = method_options(_method_named(args), args.option)  # bad options fail before any download
    loaded = _load(args, args.img_size)
    macs_ratio = _compared_at(args, specs or [])
    requests = ([PatchRequest(spec.name, args.keep_ratio, macs_ratio, spec.options) for spec in specs] if specs
                else [PatchRequest(args.method, args.keep_ratio, args.macs_ratio, options)])
    patched, unreachable = {}, []
    for request, spec in zip(requests, specs or [None]):
        try:
            model = loaded.patched(request)
        except UnreachableBudgetError as exc:  # one method of several: a row saying how near it came, as eval
            if len(requests) == 1:
                raise
            unreachable.append({"method": spec.label or spec.name, "note": str(exc)})
            continue
        patched[spec.label or spec.name if spec else get_method_name(model)] = model
    if not patched:
        raise TokenPatchError(f"no method can reach this budget: {unreachable[0]['note']}")
    rows = audit_rows(loaded.unpatched, patched, args.batch_size, args.repeats, runtime, compiled=args.compile)
    rows += unreachable
    header = {**_header(args, loaded, runtime), "batch_size": args.batch_size}
    columns = AUDIT_COLUMNS + (COMPILED_COLUMNS if args.compile else [])
    _write_results(args, header, rows, columns)
    if args.json:
        _print_json({**header, "results": rows})
    else:
        print(f"{args.model} ({loaded.weights}): {rows[0]['params'] / 1e6:.2f} M params, batch {args.batch_size}, "
              f"{runtime.describe()}, {torch.get_num_threads()} threads")
        _print_table(rows, columns, digits=2)
    return 0


def _eval(args: argparse.Namespace) -> int:
    runtime = _runtime(args)
    join_process_group(runtime.device)
    methods = _listed_methods(args.methods)
    loaded = _load(args, args.img_size)
    if not methods and loaded.saved is not None:  # the checkpoint's own patched model, as saved
        name = get_method_name(loaded.saved)
        methods = [MethodSpec(name, label=f"{name} (checkpoint)",
                              model=loaded.patched(PatchRequest(keep_ratio=args.keep_ratio)))]
    methods = methods or [MethodSpec(name) for name in training_free_methods()]
    macs_ratio = _compared_at(args, methods)  # None whenever --keep-ratio is given (the flags exclude each other)
    for spec in methods:  # a request that contradicts itself is the user's error, before any work
        lift_keep_ratio(args.keep_ratio, macs_ratio, spec.options)
    methods = [_with_checkpoint_modules(spec, loaded, args.keep_ratio) for spec in methods]
    if args.keep_ratio is None and macs_ratio is None:  # a keep ratio named for some methods: the others at the default
        methods = [_at_default_keep_ratio(spec) for spec in methods]
    dataset = _eval_dataset(args, loaded)
    first_images, _ = load_images(dataset, max(args.calibration, MAC_IMAGES))
    started = time.perf_counter()
    rows = evaluation_rows(loaded.unpatched, eval_loader(dataset, args.batch_size, args.workers, runtime), methods,
                           first_images, args.keep_ratio, macs_ratio, args.calibration, MAC_IMAGES, runtime,
                           progress=is_main_process())
    if not is_main_process():  # every process holds the summed table; one prints it
        return 0
    budget = _budget_text(args, macs_ratio, methods)
    labelled = rows[0]["top1"] is not None
    header = {**_header(args, loaded, runtime), "data": args.data, "images": rows[0]["images"], "labelled": labelled,
              "budget": budget, "processes": world_size(), "seconds": time.perf_counter() - started}
    columns = _eval_columns(labelled)
    _write_results(args, header, rows, columns)
    if args.json:
        _print_json({**header, "results": rows})
    else:
        print(f"{args.model} ({loaded.weights}): {header['images']} {'labelled' if labelled else 'unlabelled'} images "
              f"from {args.data}, {budget}, {runtime.describe()}"
              + (f", {world_size()} processes" if world_size() > 1 else ""))
        _print_table(rows, columns)
        if macs_ratio is None:
            _note_unequal_budgets(rows)
    return 0


def _budget_text(args: argparse.Namespace, macs_ratio: Optional[float], methods: Sequence[MethodSpec]) -> str:
    """What the eval table's rows spend, for its header."""
    if macs_ratio is not None:
        return f"{macs_ratio:.0%} of the MACs"
    if args.keep_ratio is not None:
        return f"keep ratio {args.keep_ratio}"
    if all(spec.model is not None for spec in methods):
        return "the checkpoint's keep ratio"
    return f"keep ratio {DEFAULT_KEEP_RATIO} unless a method names its own"


def _note_unequal_budgets(rows: Sequence[dict[str, Any]], tolerance: float = 0.05) -> None:
    """A line saying so when one keep ratio costs the methods different shares of the MACs."""
    shares = [row["macs_ratio"] for row in rows[1:] if "note" not in row]
    if len(shares) > 1 and max(shares) - min(shares) > tolerance:
        print(f"at one keep ratio the methods spend {min(shares):.2f}-{max(shares):.2f} of the MACs; "
              "--macs-ratio R compares them at the same MACs")


def _with_checkpoint_modules(spec: MethodSpec, loaded: LoadedModel, keep_ratio: Optional[float]) -> MethodSpec:
    """``spec``, run on a copy of the checkpoint's patched model (its trained modules: DynamicViT's
    predictors) with the spec's options when it names the checkpoint's method."""
    if spec.model is not None or loaded.saved is None or spec.name != get_method_name(loaded.saved):
        return spec
    model = copy.deepcopy(loaded.saved)
    changes = {**({} if keep_ratio is None else {"keep_ratio": keep_ratio}), **spec.options}
    if changes:
        set_options(model, **changes)
    return dataclasses.replace(spec, model=model)


def _at_default_keep_ratio(spec: MethodSpec) -> MethodSpec:
    """``spec`` at :data:`DEFAULT_KEEP_RATIO` unless it sets its own keep ratio or runs a checkpoint's model."""
    if spec.model is not None or "keep_ratio" in spec.options:
        return spec
    return dataclasses.replace(spec, options={**spec.options, "keep_ratio": DEFAULT_KEEP_RATIO})


def _compared_at(args: argparse.Namespace, methods: Sequence[MethodSpec]) -> Optional[float]:
    """The MACs share a table comparing ``methods`` fits them to: ``--macs-ratio``, else
    :data:`DEFAULT_MACS_RATIO` when no keep ratio is named anywhere and there is a comparison (not
    one checkpoint's model alone)."""
    named = args.keep_ratio is not None or any("keep_ratio" in spec.options for spec in methods)
    if args.macs_ratio is not None or named or not methods or all(spec.model is not None for spec in methods):
        return args.macs_ratio
    return DEFAULT_MACS_RATIO


def _eval_dataset(args: argparse.Namespace, loaded: LoadedModel) -> Dataset:
    """``--data`` (the first ``--limit`` images), prepared for the model, labels in its label space."""
    dataset = image_dataset(args.data, args.labels, input_transform(loaded.preprocessing),
                            classes_of(loaded.unpatched), args.class_map)
    return dataset if args.limit is None else Subset(dataset, range(min(args.limit, len(dataset))))


def _eval_columns(labelled: bool) -> list[str]:
    """The eval table's columns: top-1/top-5 only when every image is labelled."""
    return EVAL_COLUMNS if labelled else [c for c in EVAL_COLUMNS if c not in ("top1", "top5")]


def _print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], digits: int = 3) -> None:
    """The measured rows as a table, then a line per method that could not take the budget."""
    print(format_table([r for r in rows if "note" not in r], columns, digits=digits))
    for row in rows:
        if "note" in row:
            print(f"{row['method']}: {row['note']}")


def _method_spec(text: str) -> MethodSpec:
    """One ``--methods`` item: ``NAME[:KEY=VALUE,...]``, or ``all`` (every registered method)."""
    if text == ALL_METHODS:
        return MethodSpec(ALL_METHODS)
    try:
        return MethodSpec.parse(text)
    except TokenPatchError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _listed_methods(specs: Optional[Sequence[MethodSpec]]) -> Optional[list[MethodSpec]]:
    """``--methods`` as given (``all``: every registered method, alone), each named once; None when not given."""
    if specs is None:
        return None
    labels = [spec.label or spec.name for spec in specs]
    if ALL_METHODS in labels:
        if len(labels) > 1:
            raise TokenPatchError(f"--methods {ALL_METHODS} names every method: give it alone")
        return [MethodSpec(name) for name in sorted(available_methods())]
    repeated = first_repeated(labels)
    if repeated is not None:
        raise TokenPatchError(f"--methods names {repeated} twice")
    return list(specs)


def _add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    """``--macs-ratio`` or, exclusive with it, ``--keep-ratio``: the same budget in every command."""
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--macs-ratio", type=_macs_ratio,
                        help="instead of --keep-ratio: the share of the unpatched MACs each method spends, its keep "
                        f"ratio fitted to within 1 %% (default for a table comparing methods, eval's and audit "
                        f"--methods', when no keep ratio is named: {DEFAULT_MACS_RATIO})")
    budget.add_argument("--keep-ratio", type=_ratio, help="share of the patch tokens kept, for every method (default "
                        f"for one method: a tokenpatch checkpoint's, else {DEFAULT_KEEP_RATIO})")


def _add_methods_argument(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--methods", nargs="+", type=_method_spec, metavar="METHOD[:KEY=VALUE,...]",
                        help=f"methods to compare, each with its own options, e.g. idle idle:score=fixed tome, or "
                        f"{ALL_METHODS} (every method) (default: {default})")


def method_options(method: str, pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """``--option KEY=VALUE`` pairs read by the types of ``method``'s options (one-line errors)."""
    return parse_options(get_method(method).config_class, pairs)


def _method_named(args: argparse.Namespace) -> str:
    """The method a command's options belong to: ``--method``, else the ``--recipe``'s, else a tokenpatch
    checkpoint's, else the default."""
    if args.method is None and getattr(args, "recipe", None) is not None:
        return recipe_named(args.recipe).settings["method"].value
    saved = saved_config(args.checkpoint) if args.checkpoint else None
    return args.method or (saved["method"] if saved else DEFAULT_METHOD)


#: finetune options a recipe sets and a flag overrides: argparse dest -> FinetuneJob/FinetuneConfig field
RECIPE_FLAGS = {"method": "method", "keep_ratio": "keep_ratio", "macs_ratio": "macs_ratio", "steps": "steps",
                "minutes": "minutes", "epochs": "epochs", "batch_size": "batch_size", "accum_steps": "accum_steps",
                "lr": "lr", "module_lr": "module_lr", "weight_decay": "weight_decay", "label_weight": "label_weight",
                "distill_weight": "distill_weight", "feature_weight": "feature_weight", "temperature": "temperature",
                "mixup": "mixup", "cutmix": "cutmix", "label_smoothing": "label_smoothing", "augment": "augment",
                "drop_path": "drop_path", "token_distill_weight": "token_distill_weight",
                "aug_repeats": "aug_repeats", "ema_decay": "ema_decay", "lr_per_epoch": "lr_per_epoch"}


def _finetune(args: argparse.Namespace) -> int:
    given = {field: getattr(args, dest) for dest, field in RECIPE_FLAGS.items() if getattr(args, dest) is not None}
    options = method_options(_method_named(args), args.option)
    job = finetune_job(args.recipe, **given, **({"options": options} if options else {}),
                       model=args.model, data=args.data, checkpoint=args.checkpoint, labels=args.labels,
                       val_fraction=args.val_fraction, fold=args.fold, seed=args.seed, out=args.out,
                       class_map=args.class_map, val_data=args.val_data, workers=args.workers,
                       pretrained=not args.no_pretrained, runtime=_runtime(args), resume=args.resume,
                       eval_every=args.eval_every, save_every=args.save_every,
                       train_backbone=not args.freeze_backbone, freeze_prefix=args.freeze_prefix)
    result = run_finetune_job(job)
    if not is_main_process():
        return 0
    if args.json:
        _print_json(result)
    else:
        rows = [{"": when, **result[when]} for when in ("unpatched", "before", "after")]
        loop = result["loop"]
        print(f"{args.model} ({result['weights']}) {result['method']}@{result['keep_ratio']:.3g}: {result['macs'] / 1e9:.2f} of "
              f"{result['macs_unpatched'] / 1e9:.2f} GMACs, {result['steps']} steps on {result['train_images']} images "
              f"in {loop['seconds']:.0f} s, validated on {result['val_images']}")
        print(format_table(rows, digits=2))
        print("images/s: " + ", ".join(f"{phase} {loop[f'{phase}_img_s']:.1f}" for phase in ("data", "teacher", "student", "loop")))
    return 0


def _explain(args: argparse.Namespace) -> int:
    runtime = _runtime(args)
    options = method_options(_method_named(args), args.option)
    loaded = _load(args)
    model = loaded.patched(PatchRequest(args.method, args.keep_ratio, args.macs_ratio, options))
    result = write_explanations(model, args.images, loaded.preprocessing, args.out, runtime)
    if args.json:
        options = get_config(model).to_dict()
        _print_json({**_header(args, loaded, runtime), "method": get_method_name(model), "options": options, **result})
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


def _option(text: str) -> tuple[str, str]:
    """``KEY=VALUE``; the value is read by the option's declared type once the method is known."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, e.g. mass=0.9, got {text!r}")
    return key, value


def _add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """``--method``, the budget (``--macs-ratio`` or ``--keep-ratio``) and ``--option``."""
    parser.add_argument("--method", choices=sorted(available_methods()),
                        help=f"token-reduction method (default: a tokenpatch checkpoint's, else {DEFAULT_METHOD})")
    _add_budget_arguments(parser)
    parser.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                        help="a method option (its loss weights included), read by the option's declared type: "
                        "true/false, none, numbers, [lists]; e.g. --option fuse=true; repeatable")


def _number_in(kind: type, low: float, high: float = math.inf, *, open_low: bool = False,
               open_high: bool = False) -> Callable[[str], Any]:
    """An argparse ``type``: a finite ``kind`` (int or float) in the interval from ``low`` to ``high``
    (ends excluded where ``open_*``), or a one-line error naming the interval."""
    interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high or high == math.inf else ']'}"
    what = "an integer" if kind is int else "a number"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and low <= value <= high) or (open_low and value == low) or (
                open_high and value == high):
            raise argparse.ArgumentTypeError(f"expected {what} in {interval}, got {text!r}")
        return value

    return parse


_positive = _number_in(int, 1)
_count = _number_in(int, 0)
_positive_float = _number_in(float, 0, open_low=True)
_non_negative = _number_in(float, 0)
_fraction = _number_in(float, 0, 1, open_low=True, open_high=True)
_fraction_or_zero = _number_in(float, 0, 1, open_high=True)
_CHECKPOINT_HELP = ("weights: a state dict (.safetensors or torch) of the unpatched model, or a tokenpatch.save file, "
                    "whose method and options apply unless --method, --keep-ratio or --option say otherwise")
_MODEL_HELP = ("timm model name, e.g. deit_small_patch16_224 (its pretrained weights through timm's Hub cache), timm's "
               "hf-hub:ORG/NAME, or hf:ORG/NAME or hf:PATH for a transformers checkpoint and its image processor")
_CLASS_MAP_HELP = ("class sub-folder names in the model's label order, one per line (timm's format); ImageNet "
                   "WordNet-id folders (n01440764/...) need none")
#: data-loading processes of eval by default, as timm's validate.py (fewer on a smaller machine)
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)


def _add_model_arguments(parser: argparse.ArgumentParser, checkpoint_help: str = _CHECKPOINT_HELP) -> None:
    """The model positional, ``--checkpoint`` and ``--no-pretrained``."""
    parser.add_argument("model", help=_MODEL_HELP)
    parser.add_argument("--checkpoint", help=checkpoint_help)
    parser.add_argument("--no-pretrained", action="store_true",
                        help="random weights instead of the published ones (nothing is downloaded; the output says so)")


def _add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--amp`` and ``--channels-last`` (timm's validate.py spellings)."""
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda or cuda:N (default cpu; under torchrun, cuda is each process's own GPU)")
    parser.add_argument("--amp", choices=sorted(AMP_DTYPES), help="run the models under autocast to bfloat16 or float16")
    parser.add_argument("--channels-last", action="store_true", help="images and weights in channels-last memory format")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars (as TQDM_DISABLE=1 does)")


def _add_workers_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-j", "--workers", type=_count, default=DEFAULT_WORKERS,
                        help=f"image-decoding processes (default {DEFAULT_WORKERS} here; 0: decode in this one)")


def _add_output_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", metavar="DIR", help="also write the table to DIR/results.json (with the command, "
                        "device and library versions) and DIR/results.csv")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command, each argument's default shown in ``--help``."""
    parser, commands = top_level_parser()
    audit = _command(commands, "audit")
    _add_model_arguments(audit)
    _add_method_arguments(audit)
    _add_methods_argument(audit, "--method alone")
    audit.add_argument("--batch-size", type=_positive, default=32, help="images per timed forward (default 32)")
    audit.add_argument("--img-size", type=_positive, help="input size of a timm model (default: the model's)")
    _add_runtime_arguments(audit)
    audit.add_argument("--repeats", type=_positive, default=10, help="timed rounds (default 10; medians reported)")
    audit.add_argument("--compile", action="store_true",
                       help="also time every model under torch.compile (inductor) and report compiled next to eager")
    audit.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    _add_output_argument(audit)
    audit.set_defaults(run=_audit)

    evaluate = _command(commands, "eval")
    _add_model_arguments(evaluate, _CHECKPOINT_HELP.replace("--method, --keep-ratio or --option",
                                                            "--methods or --keep-ratio"))
    evaluate.add_argument("--data", required=True, help="image folder: flat (labels optional), class sub-folders, "
                          "or flat with labels.csv")
    evaluate.add_argument("--labels", help="file,class_index CSV (default: DATA/labels.csv when present)")
    evaluate.add_argument("--class-map", metavar="FILE", help=_CLASS_MAP_HELP)
    _add_methods_argument(evaluate, "every method that needs no training")
    _add_budget_arguments(evaluate)
    evaluate.add_argument("--calibration", type=_positive, default=16,
                          help="images the --macs-ratio fit counts MACs on (default 16)")
    evaluate.add_argument("--limit", type=_positive, help="use only the first N images")
    evaluate.add_argument("--batch-size", type=_positive, default=50, help="images per forward (default 50)")
    _add_workers_argument(evaluate)
    evaluate.add_argument("--img-size", type=_positive, help="input size of a timm model (default: the model's)")
    _add_runtime_arguments(evaluate)
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    _add_output_argument(evaluate)
    evaluate.set_defaults(run=_eval)

    tune = _command(commands, "finetune")
    _add_model_arguments(tune)
    _add_method_arguments(tune)
    tune.add_argument("--data", required=True, help="image folder: flat, class sub-folders, or flat with labels.csv")
    tune.add_argument("--labels", help="file,class_index CSV (default: DATA/labels.csv when present)")
    tune.add_argument("--class-map", metavar="FILE", help=_CLASS_MAP_HELP)
    tune.add_argument("--val-data", metavar="DIR", help="a separate validation folder (ImageNet's val/, any layout "
                      "--data may have), streamed at every evaluation; then all of --data trains")
    _add_workers_argument(tune)
    _add_runtime_arguments(tune)
    defaults = FinetuneConfig()
    tune.add_argument("--recipe", choices=sorted(RECIPES), help="a paper's fine-tuning recipe (its method, epochs, "
                      "batch, learning rates, losses and augmentation; see the Fine-tune guide); the flags below override it")
    length = tune.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive, help=f"optimisation steps (default {defaults.steps})")
    length.add_argument("--minutes", type=_positive_float,
                        help="train for this long instead of --steps (then evaluate and save as usual)")
    length.add_argument("--epochs", type=_positive, help="passes over the training images instead of --steps")
    tune.add_argument("--batch-size", type=_positive,
                      help=f"images per batch, per process under torchrun (default {FinetuneJob.batch_size})")
    tune.add_argument("--accum-steps", type=_positive,
                      help=f"batches whose gradients add up before each step (default {defaults.accum_steps}; a step on "
                      "N x --batch-size images)")
    tune.add_argument("--lr", type=_positive_float, help=f"peak learning rate (default {defaults.lr})")
    tune.add_argument("--module-lr", type=_positive_float,
                      help=f"learning rate of a method's own new modules, predictors and interpreters (default {defaults.module_lr})")
    tune.add_argument("--weight-decay", type=_non_negative, help=f"AdamW weight decay (default {defaults.weight_decay})")
    tune.add_argument("--lr-per-epoch", action=argparse.BooleanOptionalAction,
                      help="hold the learning rate through each epoch, as DeiT's loop steps timm's scheduler "
                      "(default: off, a new value every step; not with --minutes)")
    tune.add_argument("--ema-decay", type=_fraction_or_zero,
                      help=f"keep a moving average of the weights at this decay per step (timm's ModelEmaV3), score it "
                      f"at every evaluation and save it beside --out as NAME.ema.EXT (default {FinetuneJob.ema_decay}; 0: none)")
    tune.add_argument("--aug-repeats", type=_positive, help="repeated augmentation: read each image this many times "
                      "in a row, each copy augmented anew (DeiT's RASampler; default 1: off)")
    tune.add_argument("--drop-path", type=_fraction_or_zero, help="stochastic depth rate while training (timm's "
                      "drop_path_rate; default: the model's)")
    tune.add_argument("--distill-weight", type=_non_negative,
                      help=f"weight of distilling the teacher's logits (default {defaults.distill_weight}; 0: labels only)")
    tune.add_argument("--label-weight", type=_non_negative,
                      help=f"cross-entropy weight when labels exist (default {defaults.label_weight})")
    tune.add_argument("--label-smoothing", type=_fraction_or_zero,
                      help=f"label smoothing of that cross-entropy (default {defaults.label_smoothing})")
    tune.add_argument("--feature-weight", type=_non_negative,
                      help=f"weight of MSE between the student's and teacher's pooled features (default {defaults.feature_weight}; "
                      "0: off)")
    tune.add_argument("--token-distill-weight", type=_non_negative,
                      help=f"weight of MSE between the final patch tokens the student kept and the teacher's "
                      f"(default {defaults.token_distill_weight}; 0: off): DynamicViT's token distillation, dynamicvit only")
    tune.add_argument("--freeze-backbone", action="store_true",
                      help="train only the method's own modules (predictors, interpreters), not the pretrained weights")
    tune.add_argument("--freeze-prefix", action="store_true",
                      help="keep the embedding and the blocks before the first reducing block as they are (faster steps)")
    tune.add_argument("--temperature", type=_positive_float, help=f"distillation temperature (default {defaults.temperature})")
    tune.add_argument("--mixup", type=_non_negative,
                      help=f"mixup alpha for the training images (default {defaults.mixup}; 0: off; labelled "
                      "batches mix their labels too)")
    tune.add_argument("--cutmix", type=_non_negative,
                      help=f"CutMix alpha for labelled batches (default {defaults.cutmix}; 0: off; with --mixup, one of the two "
                      "per batch)")
    tune.add_argument("--augment", nargs="?", const="light", choices=sorted(TRAINING_AUGMENTATIONS),
                      help=f"training augmentation (default {FinetuneJob.augment}): light (random resized crops and "
                      "flips; the bare flag) or deit (RandAugment, random erasing: the papers' recipe)")
    tune.add_argument("--val-fraction", type=_fraction, default=FinetuneJob.val_fraction,
                      help=f"share of images held out for evaluation (default {FinetuneJob.val_fraction}; "
                      "not with --val-data)")
    tune.add_argument("--fold", type=_count, default=0,
                      help="which share of the seeded order is held out, from the end (0.5 with folds 0 and 1: swap halves)")
    tune.add_argument("--eval-every", type=_count, default=0, help="evaluate every N steps (0: at the end)")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--out", help="save the fine-tuned patched model here (tokenpatch.save format)")
    tune.add_argument("--save-every", type=_count, default=0, metavar="N",
                      help="every N steps write the resumable training state to OUT.state (needs --out)")
    tune.add_argument("--resume", metavar="FILE", help="continue the run that wrote this training state (OUT.state): "
                      "give the same model, data and options")
    tune.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    tune.set_defaults(run=_finetune)

    show = _command(commands, "explain")
    _add_model_arguments(show)
    show.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    _add_method_arguments(show)
    show.add_argument("--out", required=True, help="folder for the PNG files")
    _add_runtime_arguments(show)
    show.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    show.set_defaults(run=_explain)
    return parser


def _one_line(exc: BaseException) -> str:
    """A user error's message on one line. One raised in a ``DataLoader`` worker (an unreadable
    image) as it was raised there: torch re-raises it with the worker's traceback in the message."""
    lines = str(exc).strip().splitlines()
    if len(lines) > 1 and "DataLoader worker process" in lines[0]:
        lines = [lines[-1].partition(": ")[2]]
    return " ".join(" ".join(lines).split())


def _out_of_memory(exc: RuntimeError) -> bool:
    """True for an allocator's refusal (CUDA's ``OutOfMemoryError``, the CPU allocator's message)."""
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc)


def _command(commands: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    """A command's parser, with its summary from :data:`~tokenpatch.cli.parser.COMMANDS`."""
    return commands.add_parser(name, help=COMMANDS[name], description=COMMANDS[name])


def run_command(argv: Sequence[str]) -> int:
    """Parse ``argv`` and run its command: :func:`tokenpatch.cli.main` once a command is named."""
    argv = list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        with silenced_progress(args.quiet):
            return args.run(args)
    except (TokenPatchError, OSError) as exc:  # user errors: one line, exit 2 (a bug keeps its traceback)
        message = _one_line(exc)
        print(f"tokenpatch: error: {message[:500]}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if not _out_of_memory(exc):
            raise  # a bug keeps its traceback
        print(f"tokenpatch: error: not enough memory for this run ({_one_line(exc)[:200]}); "
              "lower --batch-size or --img-size", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the user's choice, not a failure to explain
        print("tokenpatch: interrupted", file=sys.stderr)
        return 130
