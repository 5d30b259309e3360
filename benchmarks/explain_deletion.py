"""iared2 on the real DeiT-Tiny over both halves of the shared images and several seeds: accuracy
against training-free evit at the same MACs, and how well its interpreters explain the unpatched
model (deletion AUC, lower is better; insertion AUC, higher is better).

    python benchmarks/explain_deletion.py --data ../shared/data --save-dir iared2-models \\
        --json benchmarks/results/explain_deletion.json

The 500 shared images are split in two halves by a fixed seeded order (the split of
``finetune_recovery.py``); fold 0 trains on one half and scores the other, fold 1 swaps them.
For every fold and training seed, ``iared2``'s interpreters are trained by REINFORCE with
self-distillation rewards on the training half while the backbone is distilled from the
unpatched model at the same time, as the paper trains them jointly (labels are never read for
training; ``--frozen-backbone`` trains the interpreters alone), then on the held-out half: top-1 and
agreement of the unpatched model, of ``iared2`` (at inference each group keeps the patches whose
keep probability reaches ``--threshold``, 0.5, at most its cap, so each image keeps its own number;
``--threshold none`` keeps exactly the cap, which fixes the MACs) and of training-free ``evit`` at
the keep ratio whose MACs match that ``iared2``'s mean per-image MACs; and the unpatched model's deletion curves
(most important patches removed first) and insertion curves (most important patches restored
first into a blurred copy) for: the trained interpreters' mean keep probability over the groups
in a pass that drops nothing (:func:`~tokenpatch.interpret.score_map`), the last block's raw
class-token attention, attention rollout and a random order. Each figure is the mean ± sample standard deviation over the seeds
(the attention baselines do not depend on the seed). ``--save-dir``/``--load-dir`` keep or
reuse the trained models (``fold{F}_seed{S}.safetensors``); ``--save-dir D --reuse`` trains only
those missing from ``D``; ``--accuracy-only`` skips the curves, to score saved models under
another inference rule in minutes. Training with ``--kept-target`` holds a budget (the price of
kept patches adapts); ``--expected-count`` keeps each image's expected number of patches.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

import tokenpatch
from tokenpatch.backends.build import build_timm_model
from tokenpatch.checkpoint import load_weights
from tokenpatch.data import DEIT_TINY_WEIGHTS, IMAGENET_SAMPLE, load_images, preprocessing_of
from tokenpatch.interpret import (attention_rollout, cls_attention_map, curve_auc, deletion_curve, insertion_curve,
                                  score_map)
from tokenpatch.jobs.finetune import split_dataset
from tokenpatch.measure.evaluate import accuracy, predict
from tokenpatch.measure.flops import count_macs
from tokenpatch.measure.report import format_table, write_json
from tokenpatch.training.finetune import FinetuneConfig, finetune

from shared_data import add_data_option, shared_data

MODEL = "deit_tiny_patch16_224"
SPLIT_SEED = 0  # the seeded order of the images; the training seeds do not change the halves
INTERPRETERS = "iared2 interpreters (mean keep probability)"
RAW_ATTENTION = "raw attention (last block)"


def threshold_option(text: str) -> Optional[float]:
    """``--threshold``: 'none' or a probability in (0, 1)."""
    if text.lower() == "none":
        return None
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be 'none' or a number in (0, 1), got {text}")
    return value


def model_file(folder: str, fold: int, seed: int) -> Path:
    """Where ``--save-dir``/``--load-dir`` keep the iared2 model of one fold and seed."""
    return Path(folder) / f"fold{fold}_seed{seed}.safetensors"


def mean_macs(model: torch.nn.Module, images: torch.Tensor) -> float:
    """Mean MACs of one image at batch 1 over ``images`` (input-dependent methods differ per image)."""
    return statistics.mean(count_macs(model, images[i:i + 1]).total for i in range(images.shape[0]))


def matched_evit_ratio(model: torch.nn.Module, target: float, probe: torch.Tensor) -> float:
    """The evit keep ratio whose MACs are closest to ``target`` (bisection; MACs rise with the ratio)."""
    low, high = 0.05, 1.0
    tokenpatch.patch(model, "evit", keep_ratio=high)
    for _ in range(12):
        middle = (low + high) / 2
        tokenpatch.set_keep_ratio(model, middle)
        low, high = (middle, high) if count_macs(model, probe).total < target else (low, middle)
    tokenpatch.unpatch(model)
    return round((low + high) / 2, 3)


def train_iared2(model: torch.nn.Module, train, args: argparse.Namespace, seed: int) -> None:
    """Patch ``model`` with iared2 and train its interpreters (and, unless ``--frozen-backbone``, the backbone) on ``train``."""
    torch.manual_seed(seed)
    tokenpatch.patch(model, "iared2", keep_ratio=args.keep_ratio, kept_penalty=args.penalty, kept_target=args.kept_target)
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    # no mixup: the policy learns to drop patches of the images themselves, not of blends
    config = FinetuneConfig(steps=args.steps, lr=2e-5, module_lr=args.module_lr, train_backbone=args.train_backbone,
                            mixup=0.0, freeze_prefix=False)
    finetune(model, loader, config)


def scores(model, images, labels, reference) -> dict:
    result = accuracy(predict(model, images), labels, reference)
    return {"top1": result.top1, "agreement": result.agreement}


def explanation_areas(model: torch.nn.Module, images: torch.Tensor, maps: dict[str, torch.Tensor],
                      steps: int) -> dict[str, dict]:
    """Mean deletion and insertion AUC of each (B, gh, gw) map of ``images``, on the unpatched ``model``."""
    return {name: {"deletion_auc": curve_auc(deletion_curve(model, images, m, steps)).mean().item(),
                   "insertion_auc": curve_auc(insertion_curve(model, images, m, steps)).mean().item()}
            for name, m in maps.items()}


def run_seed(model: torch.nn.Module, train, held: dict, args: argparse.Namespace, fold: int, seed: int) -> dict:
    """Train (or load) iared2 for one fold and seed; its accuracy, matched evit's, and its maps' areas."""
    images, subset = held["images"], held["subset"]
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}  # joint training changes them
    saved = model_file(args.load_dir or args.save_dir or ".", fold, seed)
    if args.load_dir or (args.reuse and saved.exists()):
        tokenpatch.load(model, saved)
    else:
        train_iared2(model, train, args, seed)
        if args.save_dir:
            tokenpatch.save(model, saved)
    # inference only: a loaded model is scored with this run's rule
    tokenpatch.set_options(model, keep_ratio=args.keep_ratio, threshold=args.threshold, expected_count=args.expected_count)
    macs = mean_macs(model, images[:32]) / held["macs"]
    result = {"iared2": {**scores(model, images, held["labels"], held["reference"]), "macs_ratio": macs}}
    maps = {} if args.accuracy_only else {INTERPRETERS: score_map(model, subset)}
    tokenpatch.unpatch(model)
    model.load_state_dict(pretrained)  # evit and the explained model are the pretrained one
    ratio = matched_evit_ratio(model, macs * held["macs"], images[:1])
    tokenpatch.patch(model, "evit", keep_ratio=ratio)
    result["evit"] = {**scores(model, images, held["labels"], held["reference"]), "keep_ratio": ratio,
                      "macs_ratio": count_macs(model, images[:1]).total / held["macs"]}
    tokenpatch.unpatch(model)
    result["explanations"] = explanation_areas(model, subset, maps, args.curve_steps)
    return result


def spread(values: list[float]) -> str:
    """'mean ± sample s.d.' of ``values`` (just the mean for one value)."""
    mean = statistics.mean(values)
    return f"{mean:.4g} ± {statistics.stdev(values):.2g}" if len(values) > 1 else f"{mean:.4g}"


def fold_tables(fold: int, held: dict, runs: list[dict], baselines: dict[str, dict]) -> tuple[list[dict], list[dict]]:
    """The accuracy and explanation rows of one fold, aggregated over its seeds."""
    def over(pick: Callable[[dict], float]) -> str:
        return spread([pick(r) for r in runs])

    accuracy_rows = [{"fold": fold, "model": "unpatched", "top1": f"{held['top1']:.1f}", "agreement": "100",
                      "macs_ratio": "1.000"}]
    for name in ("iared2", "evit"):
        label = "iared2 (trained)" if name == "iared2" else "evit, training-free, matched MACs"
        accuracy_rows.append({"fold": fold, "model": label, "top1": over(lambda r: r[name]["top1"]),
                              "agreement": over(lambda r: r[name]["agreement"]),
                              "macs_ratio": over(lambda r: r[name]["macs_ratio"])})
    names = list(runs[0]["explanations"]) + list(baselines)
    explanation_rows = []
    for name in names:
        per_seed = [r["explanations"][name] for r in runs] if name in runs[0]["explanations"] else [baselines[name]]
        explanation_rows.append({"fold": fold, "explanation": name,
                                 "deletion_auc": spread([a["deletion_auc"] for a in per_seed]),
                                 "insertion_auc": spread([a["insertion_auc"] for a in per_seed])})
    return accuracy_rows, explanation_rows


def seed_rows(runs_by_fold: dict[int, list[dict]], seeds: list[int]) -> list[dict]:
    """One row per fold and seed: iared2's and matched evit's top-1 at their MACs."""
    return [{"fold": fold, "seed": seed, "iared2 top1": f"{r['iared2']['top1']:.1f}",
             "iared2 macs": f"{r['iared2']['macs_ratio']:.3f}", "evit top1": f"{r['evit']['top1']:.1f}",
             "evit keep": r["evit"]["keep_ratio"], "evit macs": f"{r['evit']['macs_ratio']:.3f}"}
            for fold, runs in runs_by_fold.items() for seed, r in zip(seeds, runs)]


def claims(runs_by_fold: dict[int, list[dict]], baselines_by_fold: dict[int, dict]) -> list[dict]:
    """Per fold: does iared2 beat matched evit, and its interpreters raw attention, on the seeds' mean?"""
    rows = []
    for fold, runs in runs_by_fold.items():
        mean = lambda pick: statistics.mean(pick(r) for r in runs)  # noqa: E731
        row = {"fold": fold, "iared2 top-1 > evit": mean(lambda r: r["iared2"]["top1"]) > mean(lambda r: r["evit"]["top1"])}
        if RAW_ATTENTION in baselines_by_fold[fold]:  # not with --accuracy-only
            raw = baselines_by_fold[fold][RAW_ATTENTION]
            row["deletion < raw attention"] = mean(
                lambda r: r["explanations"][INTERPRETERS]["deletion_auc"]) < raw["deletion_auc"]
            row["insertion > raw attention"] = mean(
                lambda r: r["explanations"][INTERPRETERS]["insertion_auc"]) > raw["insertion_auc"]
        rows.append(row)
    return rows


def held_out_half(root: Path, model: torch.nn.Module, fold: int, args: argparse.Namespace):
    """(training subset, the held-out half's images, labels, unpatched scores and deletion subset)."""
    train, val = split_dataset(preprocessing_of(model), str(root / IMAGENET_SAMPLE), None, 0.5, SPLIT_SEED, fold=fold)
    images, labels = load_images(val)
    reference = predict(model, images)
    held = {"images": images, "labels": labels, "reference": reference,
            "subset": images[args.deletion_start: args.deletion_start + args.deletion_images],
            "macs": count_macs(model, images[:1]).total, "top1": accuracy(reference, labels).top1}
    return train, held


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_option(parser)
    parser.add_argument("--keep-ratio", type=float, default=0.8, help="iared2's per-group cap")
    parser.add_argument("--threshold", type=threshold_option, default=0.5,
                        help="iared2's inference threshold: keep the patches at least this probable, at most the "
                             "cap (default 0.5); 'none' keeps exactly the cap per group, the MACs the cap fixes")
    parser.add_argument("--expected-count", action="store_true",
                        help="iared2's inference keeps each image's expected number of patches under the trained "
                             "policy (its keep probabilities' sum), the most probable ones, at most the cap; "
                             "replaces --threshold")
    parser.add_argument("--penalty", type=float, default=0.5, help="lambda: reward per unit of kept fraction")
    parser.add_argument("--kept-target", type=float,
                        help="train the policy towards this mean kept fraction (iared2's kept_target: the penalty "
                             "adapts, starting at --penalty); default: none, --penalty stays fixed")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--module-lr", type=float, default=3e-3)
    parser.add_argument("--frozen-backbone", dest="train_backbone", action="store_false",
                        help="train the interpreters only (by default the backbone is distilled jointly, lr 2e-5)")
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1], choices=[0, 1],
                        help="0 trains on one half and scores the other, 1 swaps them")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of each fold")
    parser.add_argument("--deletion-images", type=int, default=250, help="held-out images in the deletion and insertion tests")
    parser.add_argument("--curve-steps", type=int, default=8,
                        help="portions of the patches deleted or inserted per curve (8: 1/8 of the patches at a time)")
    parser.add_argument("--accuracy-only", action="store_true",
                        help="skip the deletion and insertion curves: top-1 and MACs against matched evit only "
                             "(compares inference rules on saved models in minutes)")
    parser.add_argument("--deletion-start", type=int, default=0, help="first held-out image of those tests")
    parser.add_argument("--save-dir", help="save each trained iared2 model in this folder (fold{F}_seed{S}.safetensors)")
    parser.add_argument("--load-dir", help="skip training: load the models a --save-dir run saved")
    parser.add_argument("--reuse", action="store_true",
                        help="with --save-dir: load the models already saved there, train only the missing ones")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    root = shared_data(parser, args)
    if args.reuse and not args.save_dir:
        parser.error("--reuse needs --save-dir (the folder of the models to reuse)")
    if args.load_dir and not all(model_file(args.load_dir, f, s).exists() for f in args.folds for s in args.seeds):
        parser.error(f"--load-dir {args.load_dir} lacks a fold{{F}}_seed{{S}}.safetensors of the folds and seeds asked for")
    if args.save_dir:
        Path(args.save_dir).mkdir(parents=True, exist_ok=True)
    started = time.time()
    model = build_timm_model(MODEL)
    load_weights(model, root / DEIT_TINY_WEIGHTS)
    accuracy_rows, explanation_rows, runs_by_fold, baselines_by_fold = [], [], {}, {}
    for fold in args.folds:
        train, held = held_out_half(root, model, fold, args)
        subset = held["subset"]
        random_order = torch.rand(subset.shape[0], *model.patch_embed.grid_size,
                                  generator=torch.Generator().manual_seed(SPLIT_SEED))
        baselines_by_fold[fold] = {} if args.accuracy_only else explanation_areas(model, subset, {
            RAW_ATTENTION: cls_attention_map(model, subset), "attention rollout": attention_rollout(model, subset),
            "random order": random_order}, args.curve_steps)
        runs_by_fold[fold] = [run_seed(model, train, held, args, fold, seed) for seed in args.seeds]
        rows = fold_tables(fold, held, runs_by_fold[fold], baselines_by_fold[fold])
        accuracy_rows += rows[0]
        explanation_rows += rows[1]
    seconds = time.time() - started
    trained = ("loaded from " + args.load_dir if args.load_dir else
               f"{args.steps} steps x {args.batch_size} on 250 images (backbone {'trained' if args.train_backbone else 'frozen'})")
    rule = "expected count" if args.expected_count else f"threshold {args.threshold}"
    print(f"iared2 on {MODEL} (cap {args.keep_ratio}, {rule}, penalty {args.penalty}, kept target {args.kept_target}): "
          f"{trained}; folds {args.folds}, "
          f"seeds {args.seeds}, {seconds:.0f} s; 250 held-out images per fold, " + (
              "no curves" if args.accuracy_only else f"deletion and insertion on {args.deletion_images} from image "
              f"{args.deletion_start} in {args.curve_steps} steps") + "; mean ± s.d. over the seeds")
    for rows in (accuracy_rows, seed_rows(runs_by_fold, args.seeds), explanation_rows):
        if rows:
            print(format_table(rows) + "\n")
    print(format_table(claims(runs_by_fold, baselines_by_fold)))
    if args.json:
        write_json({"args": vars(args), "accuracy": accuracy_rows, "explanations": explanation_rows,
                    "runs": {str(f): r for f, r in runs_by_fold.items()},
                    "baselines": {str(f): b for f, b in baselines_by_fold.items()}, "seconds": seconds}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
