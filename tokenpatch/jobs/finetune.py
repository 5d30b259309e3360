"""The ``tokenpatch finetune`` job: data split, before/after evaluation, fine-tuning, saving.

:func:`run_finetune_job` is the library half of the command (the CLI only parses arguments into
a :class:`FinetuneJob`); benchmarks call it directly.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..api import get_config, get_method_name
from ..checkpoint import save
from ..backends.build import Preprocessing
from ..core.distributed import is_main_process, join_process_group, world_size
from ..data import RememberedItems, augmentation_named, has_labels, image_dataset, input_transform
from ..errors import CheckpointError, InvalidOptionError
from ..measure.evaluate import streamed_top1
from ..measure.flops import count_macs
from ..measure.runtime import Runtime
from ..training.finetune import FinetuneConfig, finetune, unpatched_behaviour
from ..training.recipes import recipe_named
from ..training.sampling import EpochSampler, SeededItems
from .evaluation import classes_of
from .models import PatchRequest, load_model


#: folders up to this many images (training ones when not augmented, validation ones) are decoded
#: once and kept in memory when read in the main process (about 0.6 MB per 224 px image); larger
#: ones are read from disk every epoch and every evaluation
REMEMBERED_IMAGES = 1024


@dataclass
class FinetuneJob:
    """What ``tokenpatch finetune`` does, as data.

    Attributes:
        model: timm model name (``hf-hub:`` names too) or ``hf:NAME``/``hf:PATH`` (transformers),
            with its published weights unless ``checkpoint`` (or not ``pretrained``).
        data: image folder (flat, class sub-folders, or flat with ``labels.csv``).
        method, keep_ratio, options: the patch; ``None`` (and no options): the checkpoint's own
            when it is a ``tokenpatch.save`` file, else the default method (``tome``) at 0.5.
        checkpoint: weights of the unpatched model (.safetensors or torch state dict), or a
            ``tokenpatch.save`` file to fine-tune further (its method modules' weights included).
        labels: a ``file,class_index`` CSV (default: ``data/labels.csv`` when present).
        val_data: a separate validation folder (any layout ``data`` may have, its own
            ``labels.csv``), streamed at every evaluation; then all of ``data`` trains and
            ``val_fraction``/``fold`` are not used.
        workers: image-decoding processes for the training and validation batches (0: this one).
        class_map: class folder names in the model's label order (timm's text format); ImageNet
            WordNet ids need none.
        macs_ratio: instead of ``keep_ratio``, the share of the unpatched MACs to spend (the keep
            ratio is fitted, :func:`tokenpatch.set_macs_ratio`).
        val_fraction: share of the images held out for evaluation.
        fold: which share is held out, counted from the end of the seeded order (cross-validation:
            with ``val_fraction=0.5``, folds 0 and 1 swap the halves).
        augment: training augmentation: False (none), True or ``"light"`` (random resized crops
            and flips), ``"deit"`` (the papers' RandAugment recipe); see
            :data:`~tokenpatch.data.TRAINING_AUGMENTATIONS`.
        batch_size: images per batch (per process under torchrun); a step adds up
            ``config.accum_steps`` batches.
        seed: seeds the split, the shuffling and the training.
        out: save the fine-tuned patched model here (``tokenpatch.save`` format).
        config: the optimisation options.
        epochs: instead of ``config.steps``/``config.minutes``, this many passes over the
            training images (steps = epochs x batches per process and epoch).
        pretrained: load the model's published weights when there is no ``checkpoint``.
        runtime: the device the model trains and is evaluated on, under its autocast (training
            too, with a grad scaler for fp16) and memory format.
        resume: a training state (``OUT.state``, written every ``config.save_every`` steps) to
            continue from; the rest of the job must be the same as the run that wrote it.
        recipe: the paper's recipe the job's values come from (:func:`finetune_job` fills them
            in; :mod:`tokenpatch.training.recipes`), recorded in the result.
        total_batch: images per optimisation step over all processes: ``config.accum_steps`` is
            set to reach it (None: ``config.accum_steps`` as given).
        lr_batch: ``config.lr`` and ``config.module_lr`` are for this many images per step and
            scale linearly with the total batch (DeiT's rule; None: used as given).
        min_lr: the floor of the cosine decay, as a learning rate (instead of
            ``config.min_lr_ratio``).
        warmup_epochs: warm-up in passes over the training images (instead of
            ``config.warmup_steps``).
        drop_path: stochastic depth rate to train with (timm's ``drop_path_rate``; None: the model's).
        aug_repeats: DeiT's repeated augmentation: each image of an epoch's order read this many
            times in a row, each copy augmented anew, an epoch the same length (timm's
            ``--aug-repeats``; :class:`~tokenpatch.training.sampling.EpochSampler`; 1: off).
        ema_decay: keep a moving average of the weights at this decay per step (timm's
            ``ModelEmaV3``), score it at every evaluation (``after_ema``) and save it beside
            ``out`` as ``NAME.ema.EXT`` (0: none).
        lr_per_epoch: hold the learning rate through each epoch as DeiT's loop does
            (``config.lr_epoch_steps`` set to the steps of an epoch).
    """

    model: str
    data: str
    method: Optional[str] = None
    keep_ratio: Optional[float] = None
    options: dict[str, Any] = field(default_factory=dict)
    checkpoint: Optional[str] = None
    labels: Optional[str] = None
    macs_ratio: Optional[float] = None
    val_fraction: float = 0.2
    fold: int = 0
    augment: Union[bool, str] = False
    batch_size: int = 32
    seed: int = 0
    out: Optional[str] = None
    config: FinetuneConfig = field(default_factory=FinetuneConfig)
    epochs: Optional[int] = None
    class_map: Optional[str] = None
    val_data: Optional[str] = None
    workers: int = 0
    pretrained: bool = True
    runtime: Runtime = field(default_factory=Runtime)
    resume: Optional[str] = None
    recipe: Optional[str] = None
    total_batch: Optional[int] = None
    lr_batch: Optional[int] = None
    min_lr: Optional[float] = None
    warmup_epochs: Optional[float] = None
    drop_path: Optional[float] = None
    aug_repeats: int = 1
    ema_decay: float = 0.0
    lr_per_epoch: bool = False


@dataclass
class HeldOut:
    """Validation images, streamed batch by batch each time a model is scored: their labels (or
    None), the unpatched model's top-1 on each, and the runtime the evaluations run with. Only the
    (M,) labels and top-1 stay in memory, never the images."""

    batches: DataLoader
    labels: Optional[Tensor]
    reference: Tensor
    runtime: Runtime = field(default_factory=Runtime)

    def __len__(self) -> int:
        return len(self.reference)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Agreement with the unpatched top-1 (and top-1 when labelled), in percent."""
        return self.scores(streamed_top1(model, self.batches, self.runtime)[0])

    def scores(self, top1: Tensor) -> dict[str, float]:
        """Agreement (and top-1 when labelled) of (M,) predicted classes, in percent."""
        scores = {"agreement": 100.0 * (top1 == self.reference).double().mean().item()}
        if self.labels is not None:
            scores["top1"] = 100.0 * (top1 == self.labels).double().mean().item()
        return scores


def split_dataset(preprocessing: Preprocessing, data: str, labels: Optional[str], val_fraction: float, seed: int,
                  augment: Union[bool, str] = False, fold: int = 0, num_classes: Optional[int] = None,
                  class_map: Optional[str] = None) -> tuple[Subset, Subset]:
    """(train subset, validation subset) of the folder, labels in the model's ``num_classes`` (see
    :func:`~tokenpatch.data.image_dataset`); validation uses the model's evaluation transform,
    training too unless ``augment`` (then :func:`~tokenpatch.data.input_transform`'s training one
    it names, see :func:`~tokenpatch.data.augmentation_named`).

    The images are put in a seeded order; the validation subset is its ``fold``-th share of
    ``val_fraction`` counted from the end, the training subset the rest.
    """
    evaluated = image_dataset(data, labels, input_transform(preprocessing), num_classes, class_map)
    augmentation = augmentation_named(augment)
    trained = image_dataset(data, labels, input_transform(preprocessing, True, augmentation), num_classes,
                            class_map) if augmentation else evaluated
    order = torch.randperm(len(evaluated), generator=torch.Generator().manual_seed(seed)).tolist()
    held = len(order) - int(round(len(order) * (1 - val_fraction)))
    if held == 0 or held == len(order):
        raise InvalidOptionError(f"--val-fraction {val_fraction} leaves an empty split of {len(order)} images")
    folds = len(order) // held
    if not 0 <= fold < folds:
        raise InvalidOptionError(f"--fold {fold} out of range: --val-fraction {val_fraction} makes folds 0..{folds - 1}")
    end = len(order) - fold * held
    return Subset(trained, order[:end - held] + order[end:]), Subset(evaluated, order[end - held:end])


def held_out(model: nn.Module, dataset: Dataset, runtime: Runtime = Runtime(), workers: int = 0,
             batch_size: int = 32) -> HeldOut:
    """The validation set ``dataset`` as a :class:`HeldOut`: the unpatched model's top-1 on every
    image (one streamed pass) and the labels. A small set read in this process is decoded once and
    kept (its images are scored again at every evaluation); a large one, or one read by ``workers``,
    is decoded again each time."""
    if workers == 0 and len(dataset) <= REMEMBERED_IMAGES:
        dataset = RememberedItems(dataset)
    batches = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                         pin_memory=runtime.pin_memory, generator=torch.Generator())  # leaves the global one alone
    with unpatched_behaviour(model):
        reference, labels = streamed_top1(model, batches, runtime)
    return HeldOut(batches, labels if (labels >= 0).all() else None, reference, runtime)


def _loader(train: Dataset, batch_size: int, seed: int, workers: int = 0, pin_memory: bool = False,
            aug_repeats: int = 1) -> DataLoader:
    """Shuffled batches decoded by ``workers`` processes (kept across epochs); under torchrun each
    process gets its own shard (``batch_size`` per process). Each epoch's order and each image's
    augmentation depend only on ``seed``, the epoch and the image
    (:class:`~tokenpatch.training.sampling.EpochSampler`), so a resumed run reads what the
    interrupted one would have, whatever ``workers``; ``aug_repeats`` copies of each image in a
    row (repeated augmentation). Incomplete last batches are dropped when
    there is at least one full one."""
    drop_last = len(train) >= batch_size * world_size()
    if not (isinstance(aug_repeats, int) and aug_repeats >= 1):
        raise InvalidOptionError(f"aug_repeats must be a positive integer, got {aug_repeats!r}")
    sampler = EpochSampler(train, seed, repeats=aug_repeats)
    return DataLoader(SeededItems(train, seed), sampler=sampler, batch_size=batch_size,
                      drop_last=drop_last, num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0,
                      generator=torch.Generator().manual_seed(seed))  # worker seeds: not from the global generator


def run(model: nn.Module, train: Dataset, val: HeldOut, config: FinetuneConfig, job: FinetuneJob,
        ema: Optional[nn.Module] = None) -> dict[str, Any]:
    """Fine-tune ``model`` on ``train`` as ``job`` says (its batch size, seed, workers, epochs,
    warm-up epochs, repeated augmentation, learning rate held per epoch and training state to
    resume from; ``config`` otherwise), keeping the moving average ``ema`` when given, and report
    before/after scores on ``val``, the MACs and the options it ran with."""
    before = val.evaluate(model.eval())
    loader = _loader(train, job.batch_size, job.seed, job.workers, val.runtime.pin_memory, job.aug_repeats)
    steps_per_epoch = max(1, len(loader) // config.accum_steps)
    if job.epochs is not None:
        config = dataclasses.replace(config, steps=job.epochs * steps_per_epoch, minutes=None)
    if job.warmup_epochs is not None:
        config = dataclasses.replace(config, warmup_steps=round(job.warmup_epochs * steps_per_epoch))
    if job.lr_per_epoch:
        config = dataclasses.replace(config, lr_epoch_steps=steps_per_epoch)
    history = finetune(model, loader, config, evaluate=val.evaluate, resume=job.resume, ema=ema)
    macs = count_macs(model).total
    with unpatched_behaviour(model):
        macs_unpatched = count_macs(model).total
    after = {k: v for k, v in history[-1].items() if k in before}  # empty off rank 0, which alone evaluates
    after_ema = {k[len("ema_"):]: v for k, v in history[-1].items() if k.startswith("ema_")}
    with unpatched_behaviour(model):
        after_dense = val.evaluate(model) if is_main_process() else {}
    loop = {k: v for k, v in history[-1].items() if k.endswith("_img_s") or k == "seconds"}
    return {"unpatched": val.scores(val.reference), "before": before, "after": after, "after_dense": after_dense,
            **({"after_ema": after_ema} if ema is not None else {}),
            "macs": macs, "macs_unpatched": macs_unpatched, "steps": history[-1]["step"], "loop": loop,
            "finetune_config": dataclasses.asdict(config),
            "train_images": len(train), "val_images": len(val), "final_loss": history[-1]["loss"],
            "losses": [record["loss"] for record in history]}


def run_finetune_job(job: FinetuneJob) -> dict[str, Any]:
    """Patch, fine-tune and evaluate as ``job`` says; return the scores before/after, MACs and sizes."""
    join_process_group(job.runtime.device)
    torch.manual_seed(job.seed)
    _check_writable(job.out)
    if job.config.save_every and not (job.out or job.config.state_path):
        raise InvalidOptionError("--save-every needs --out: the training state is written to OUT.state")
    loaded = load_model(job.model, job.checkpoint, pretrained=job.pretrained, drop_path=job.drop_path)
    model = job.runtime.place(loaded.patched(PatchRequest(job.method, job.keep_ratio, job.macs_ratio, job.options)))
    train, val = _datasets(job, loaded.preprocessing, classes_of(model))
    config = resolved_config(job)
    if config.distill_weight == 0 and config.feature_weight == 0 and not has_labels(train):
        raise InvalidOptionError(f"nothing to learn from: no distillation (distill_weight 0"
                                 f"{', the ' + job.recipe + ' recipe' if job.recipe else ''}) and {job.data} has no labels")
    if not job.augment and job.workers == 0 and len(train) <= REMEMBERED_IMAGES:
        train = RememberedItems(train)
    ema = moving_average(model, job.ema_decay)
    result = run(model, train, held_out(model, val, job.runtime, job.workers), config, job, ema)
    if job.out and is_main_process():
        save(model, job.out)
        if ema is not None:
            save(ema.module, ema_path(job.out))
    return {"model": job.model, "weights": loaded.weights, "recipe": job.recipe, "method": get_method_name(model),
            "keep_ratio": get_config(model).keep_ratio, "options": get_config(model).to_dict(),
            "world_size": world_size(), "batch_size": job.batch_size, "augment": job.augment, "epochs": job.epochs,
            "drop_path": job.drop_path, **result, "out": job.out,
            **({"ema_out": ema_path(job.out)} if ema is not None and job.out else {})}


def resolved_config(job: FinetuneJob) -> FinetuneConfig:
    """``job.config`` as this run applies it: the runtime's autocast, the state file next to
    ``out``, the accumulation that reaches ``total_batch`` over this run's processes, the learning
    rates scaled linearly from ``lr_batch`` images to the total batch, and the ``min_lr`` floor
    as a share of the learning rate."""
    config = dataclasses.replace(job.config, amp=job.runtime.amp, state_path=job.config.state_path or state_path(job.out))
    per_step = job.batch_size * world_size()
    if job.total_batch is not None:
        config.accum_steps = max(1, math.ceil(job.total_batch / per_step))
    if job.lr_batch is not None:
        scale = per_step * config.accum_steps / job.lr_batch
        config.lr, config.module_lr = config.lr * scale, config.module_lr * scale
    if job.min_lr is not None:
        config.min_lr_ratio = min(1.0, job.min_lr / config.lr)
    return config


def finetune_job(recipe: Optional[str] = None, **given: Any) -> FinetuneJob:
    """A :class:`FinetuneJob` from the values of ``recipe`` (see :mod:`tokenpatch.training.recipes`)
    with ``given`` over them: :class:`FinetuneJob` and :class:`FinetuneConfig` fields by name, and
    ``options`` merged key by key into the recipe's. A given ``lr`` replaces the recipe's scaled
    one, ``accum_steps`` its total batch, ``steps`` or ``minutes`` its epochs (``minutes`` its
    learning rate held per epoch too), ``macs_ratio`` its keep ratio.

    Raises:
        InvalidOptionError: an unknown recipe or field, or another method than the recipe's.
    """
    values = recipe_named(recipe).values() if recipe else {}
    if recipe and given.get("method") not in (None, values["method"]):
        raise InvalidOptionError(f"--recipe {recipe} trains {values['method']}; for --method {given['method']} "
                                 "give its options yourself")
    for key, replaced in (("lr", "lr_batch"), ("accum_steps", "total_batch"), ("steps", "epochs"),
                          ("minutes", "epochs"), ("minutes", "lr_per_epoch"), ("macs_ratio", "keep_ratio")):
        if key in given:
            values.pop(replaced, None)
    options = {**values.pop("options", {}), **given.pop("options", {})}
    values.update(given)
    config_fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    job_fields = {f.name for f in dataclasses.fields(FinetuneJob)} - {"config", "options", "recipe"}
    unknown = sorted(values.keys() - config_fields - job_fields)
    if unknown:
        raise InvalidOptionError(f"unknown fine-tuning settings: {', '.join(unknown)}")
    config = FinetuneConfig(**{k: v for k, v in values.items() if k in config_fields})
    return FinetuneJob(**{k: v for k, v in values.items() if k in job_fields}, options=options, config=config,
                       recipe=recipe)


def _datasets(job: FinetuneJob, preprocessing: Preprocessing, num_classes: int) -> tuple[Dataset, Dataset]:
    """(training, validation) images of ``job``: all of ``data`` and the ``val_data`` folder, or
    ``data`` split by ``val_fraction`` and ``fold``; labels in the model's ``num_classes``."""
    if job.val_data is None:
        return split_dataset(preprocessing, job.data, job.labels, job.val_fraction, job.seed, job.augment, job.fold,
                             num_classes, job.class_map)
    augmentation = augmentation_named(job.augment)
    train = image_dataset(job.data, job.labels, input_transform(preprocessing, augmentation is not None,
                                                                augmentation or "light"), num_classes, job.class_map)
    return train, image_dataset(job.val_data, None, input_transform(preprocessing), num_classes, job.class_map)


def moving_average(model: nn.Module, decay: float) -> Optional[nn.Module]:
    """timm's ``ModelEmaV3`` of ``model`` at a constant ``decay`` (what DeiT's ``ModelEma`` does),
    or None when ``decay`` is 0."""
    if not (isinstance(decay, (int, float)) and 0 <= decay < 1):
        raise InvalidOptionError(f"ema_decay must be in [0, 1) (0: no moving average), got {decay!r}")
    if decay == 0:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay)


def ema_path(out: str) -> str:
    """Where a job saving to ``out`` writes the moving average: ``NAME.ema.EXT`` beside it."""
    target = Path(out)
    return str(target.with_name(f"{target.stem}.ema{target.suffix}"))


def state_path(out: Optional[str]) -> Optional[str]:
    """Where a job saving to ``out`` writes its resumable training state: ``OUT.state``."""
    return f"{out}.state" if out else None


def _check_writable(out: Optional[str]) -> None:
    """Refuse an ``out`` path that could not be written before spending minutes on training."""
    if out is None:
        return
    target = Path(out)
    if target.is_dir():
        raise CheckpointError(f"cannot write {out}: it is a folder")
    folder = target.resolve().parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise CheckpointError(f"cannot write {out}: {folder} is not a writable folder")
