"""The papers' fine-tuning recipes as presets of ``tokenpatch finetune --recipe NAME``.

Each value says where it comes from: a line of the official training command or code (read at
the repositories' current default branch; files named relative to the repository root). The
names are those of :class:`~tokenpatch.jobs.finetune.FinetuneJob` and
:class:`~tokenpatch.training.FinetuneConfig`; ``options`` are the method's own. A few pieces of
the official scripts are not reproduced; each recipe lists them in ``not_reproduced``.

How the batch and the learning rate scale: ``total_batch`` is the official number of images per
optimisation step over all processes; a run with fewer processes or a smaller ``batch_size``
accumulates gradients (``accum_steps``) to reach it. Where the official code scales the learning
rate linearly with the total batch (DeiT's ``lr * batch_size * world_size / 512``), ``lr`` is
given per ``lr_batch`` images and scaled the same way.

SaiT (Li et al., 2022) and IA-RED² (Pan et al., NeurIPS 2021) published no training code, and
their papers' training sections could not be read here (only their abstracts are in the
reference material this project can reach), so they have no preset: inventing their values
would misattribute them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidOptionError


@dataclass(frozen=True)
class Setting:
    """One value of a recipe and where it comes from."""

    value: Any
    source: str


@dataclass(frozen=True)
class Recipe:
    """A paper's fine-tuning recipe: its settings by name, and what of the official script is not reproduced."""

    name: str
    paper: str
    code: str
    settings: dict[str, Setting]
    not_reproduced: tuple[str, ...] = field(default_factory=tuple)

    def values(self) -> dict[str, Any]:
        """The settings' values by name (``options`` as a dict)."""
        return {name: setting.value for name, setting in self.settings.items()}


# DeiT's training script, which all three repositories start from, sets these in main.py's defaults
def _deit_labels(main: str, mixup: str, cutmix: str, smoothing: str) -> dict[str, Setting]:
    """Cross-entropy on labels mixed by timm's Mixup/CutMix with label smoothing, as DeiT's main.py does."""
    return {
        "label_weight": Setting(1.0, f"{main}: the classification loss (SoftTargetCrossEntropy) enters with weight 1"),
        "mixup": Setting(0.8, f"{main}:{mixup} --mixup 0.8"),
        "cutmix": Setting(1.0, f"{main}:{cutmix} --cutmix 1.0"),
        "label_smoothing": Setting(0.1, f"{main}:{smoothing} --smoothing 0.1"),
        "augment": Setting("deit", f"{main}: --aa rand-m9-mstd0.5-inc1, --reprob 0.25, --color-jitter 0.4, "
                                   "--train-interpolation bicubic (datasets.py build_transform)"),
        "clip_norm": Setting(None, f"{main}: --clip-grad None"),
        "decay_every_weight": Setting(False, "timm's optimizer rule: no decay on biases, norms, pos_embed, cls_token"),
    }


def _deit_loop(main: str, ema: str, update: str, evaluated: str, scheduler: str) -> dict[str, Setting]:
    """What DeiT's loop does around the step: a moving average of the weights (timm's ``ModelEma``,
    updated after every step, saved, not evaluated) and the learning rate stepped per epoch."""
    return {
        "ema_decay": Setting(0.99996, f"{main}:{ema} --model-ema on, --model-ema-decay 0.99996; engine.py:{update} "
                                      f"update after each step; {main}:{evaluated} evaluates the model, not the EMA"),
        "lr_per_epoch": Setting(True, f"{main}:{scheduler} lr_scheduler.step(epoch) after each epoch (timm's "
                                      "cosine, t_in_epochs)"),
    }


#: DeiT's RASampler (samplers.py) reads a multiple of 256 images per epoch; EpochSampler reads them all
_EPOCH_ROUNDING = "an epoch of repeated augmentation rounded down to a multiple of 256 images (samplers.py:30)"


RECIPES: dict[str, Recipe] = {
    "idlevit": Recipe(
        name="idlevit",
        paper="Xu et al., IdleViT, AJCAI 2023 (arXiv:2310.05654)",
        code="https://github.com/Ackesnal/IdleViT",
        settings={
            "method": Setting("idle", "the repository's method"),
            "keep_ratio": Setting(0.7, "README.md:18 --base_rate 0.7"),
            "epochs": Setting(30, "README.md:18 --epochs 30"),
            "batch_size": Setting(1024, "README.md:18 --batch-size 1024 (per process)"),
            "total_batch": Setting(2048, "README.md:18 --nproc_per_node=2 x --batch-size 1024"),
            "lr": Setting(1e-5, "README.md:18 --lr 1e-5"),
            "lr_batch": Setting(512, "main.py:464 lr * batch_size * world_size / 512"),
            "min_lr": Setting(1e-6, "README.md:18 --min-lr 1e-6"),
            "warmup_epochs": Setting(0, "main.py:85 --warmup-epochs 0"),
            "weight_decay": Setting(0.05, "main.py:64 --weight-decay 0.05"),
            "freeze_tokens": Setting(True, "main.py:183-201 get_param_groups leaves cls_token and pos_embed out"),
            "drop_path": Setting(0.1, "main.py:41 --drop-path 0.1"),
            "aug_repeats": Setting(3, "main.py:104-106 --repeated-aug on by default: main.py:243 RASampler, 3 copies "
                                      "(samplers.py)"),
            "distill_weight": Setting(10.0, "README.md:18 --distillw 10.0; losses.py:153 KL, batchmean, T=1"),
            "feature_weight": Setting(1000.0, "losses.py:88 distill_weight * 100"),
            "feature_normalize": Setting(True, "losses.py:157 MSE of L2-normalised class-token features"),
            "options": Setting({"cut_weight": 20.0, "idle_update": "unchanged"},
                               "main.py:172 --cutw 20; losses.py:164 cut loss / idle layers (README.md:18 --cutloss_type "
                               "both); vit.py: idle tokens pass through unchanged"),
            **_deit_labels("main.py", "119", "121", "100"),
            **_deit_loop("main.py", "45-48", "56-57", "547", "533"),
        },
        not_reproduced=(_EPOCH_ROUNDING,),
    ),
    "evit": Recipe(
        name="evit",
        paper="Liang et al., EViT, ICLR 2022 (arXiv:2202.07800)",
        code="https://github.com/youweiliang/evit",
        settings={
            "method": Setting("evit", "the repository's method"),
            "keep_ratio": Setting(0.7, "finetune.sh:12 --base_keep_rate 0.7"),
            "options": Setting({"fuse": True}, "finetune.sh:11 --fuse_token"),
            "epochs": Setting(30, "finetune.sh:22 --epochs 30"),
            "batch_size": Setting(256, "finetune.sh:18 --batch-size 256 (per process)"),
            "total_batch": Setting(2048, "finetune.sh:8 --nproc_per_node=8 x --batch-size 256"),
            "lr": Setting(2e-5, "finetune.sh:15 --lr 2e-5"),
            "lr_batch": Setting(512, "main.py:363 lr * batch_size * world_size / 512"),
            "min_lr": Setting(2e-6, "finetune.sh:16 --min-lr 2e-6"),
            "warmup_epochs": Setting(0, "finetune.sh:20 --warmup-epochs 0"),
            "weight_decay": Setting(1e-6, "finetune.sh:17 --weight-decay 1e-6"),
            "drop_path": Setting(0.0, "main.py:447 fine-tuning (--finetune) keeps the model in eval mode, so "
                                      "--drop-path 0.1 (main.py:63) never acts"),
            "aug_repeats": Setting(3, "main.py:122-124 --repeated-aug on by default: main.py:222 RASampler, 3 copies "
                                      "(samplers.py)"),
            "distill_weight": Setting(0.0, "main.py:154 --distillation-type none (main.py:202: no distillation "
                                           "when fine-tuning)"),
            **_deit_labels("main.py", "137", "139", "118"),
            **_deit_loop("main.py", "66-69", "73-74", "467", "451"),
        },
        not_reproduced=(_EPOCH_ROUNDING,),
    ),
    "dynamicvit": Recipe(
        name="dynamicvit",
        paper="Rao et al., DynamicViT, NeurIPS 2021 (arXiv:2106.02034)",
        code="https://github.com/raoyongming/DynamicViT",
        settings={
            "method": Setting("dynamicvit", "the repository's method"),
            "keep_ratio": Setting(0.7, "README.md:127 --base_rate 0.7"),
            "epochs": Setting(30, "README.md:127 --epochs 30"),
            "batch_size": Setting(128, "README.md:127 --batch_size 128 (per process)"),
            "total_batch": Setting(1024, "README.md:127 --nproc_per_node=8 x --batch_size 128 (main.py:485)"),
            "lr": Setting(1e-5, "README.md:127 --lr 1e-3 x main.py:189 --lr_scale 0.01 for the backbone "
                                "(optim_factory.py:106)"),
            "module_lr": Setting(1e-3, "README.md:127 --lr 1e-3 for the predictors (optim_factory.py:82)"),
            "min_lr": Setting(1e-8, "main.py:87 --min_lr 1e-6 x --lr_scale 0.01 (utils.py:432 schedule, scaled "
                                    "per group)"),
            "warmup_epochs": Setting(5, "README.md:127 --warmup_epochs 5 (linear from 0, utils.py:440)"),
            "weight_decay": Setting(0.05, "main.py:78 --weight_decay 0.05"),
            "freeze_tokens": Setting(True, "optim_factory.py:80 leaves cls_token and pos_embed out"),
            "drop_path": Setting(0.0, "main.py:54 --drop_path 0 (README.md:133: 0.2 for DeiT-B)"),
            "aug_repeats": Setting(1, "main.py:218 DistributedSampler: no repeated augmentation"),
            "distill_weight": Setting(0.5, "main.py:425 distill_weight=0.5; losses.py:152 KL, batchmean, T=1"),
            "token_distill_weight": Setting(0.5, "main.py:425 mse_token=True, distill_weight=0.5; losses.py:162-175 "
                                                 "MSE over the kept final patch tokens"),
            "options": Setting({"ratio_weight": 2.0}, "main.py:191 --ratio_weight 2.0 (README.md:133: 5.0 for "
                                                      "DeiT-B); losses.py:185 ratio loss / prune stages"),
            **_deit_labels("main.py", "118", "120", "99"),
            "ema_decay": Setting(0.9999, "main.py:62-63 --model_ema True, --model_ema_decay 0.9999; engine.py:77-86 "
                                         "update after each step; main.py:65,583-584 evaluates the EMA too"),
            "lr_per_epoch": Setting(False, "engine.py:39-44 a learning rate per iteration (utils.py:432 cosine_scheduler)"),
        },
    ),
}


def recipe_named(name: str) -> Recipe:
    """The recipe ``name``; a one-line error naming the known ones otherwise."""
    if name not in RECIPES:
        raise InvalidOptionError(f"unknown recipe {name!r}: expected one of {', '.join(RECIPES)} "
                                 "(sait and iared2 have no published training code; see tokenpatch.training.recipes)")
    return RECIPES[name]


def recipe_table() -> str:
    """The recipes as a Markdown table (the README's): one row per setting, one column per recipe,
    each cell the value and its source."""
    names = sorted(RECIPES)
    settings = list(dict.fromkeys(key for name in names for key in RECIPES[name].settings))
    rows = [f"| setting | {' | '.join(f'`{name}`' for name in names)} |", "| --- |" + " --- |" * len(names)]
    for key in settings:
        cells = []
        for name in names:
            setting = RECIPES[name].settings.get(key)
            cells.append("–" if setting is None else f"`{setting.value!r}` ({setting.source})".replace("|", "\\|"))
        rows.append(f"| `{key}` | {' | '.join(cells)} |")
    return "\n".join(rows)
