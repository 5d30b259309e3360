"""The ``tokenpatch finetune`` job: data split, before/after evaluation, fine-tuning, saving.

:func:`run_finetune_job` is the library half of the command (the CLI only parses arguments into
a :class:`FinetuneJob`); benchmarks call it directly.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ..api import get_config, get_method_name
from ..checkpoint import save
from ..backends.build import Preprocessing
from ..core.distributed import in_process_group, is_main_process, join_process_group, world_size
from ..data import RememberedItems, image_dataset, input_transform, load_images
from ..errors import CheckpointError, InvalidOptionError
from ..measure.evaluate import accuracy, predict
from ..measure.flops import count_macs
from ..measure.runtime import Runtime
from ..training.finetune import FinetuneConfig, finetune, unpatched_behaviour
from .evaluation import classes_of
from .models import PatchRequest, load_model


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
        class_map: class folder names in the model's label order (timm's text format); ImageNet
            WordNet ids need none.
        macs_ratio: instead of ``keep_ratio``, the share of the unpatched MACs to spend (the keep
            ratio is fitted, :func:`tokenpatch.set_macs_ratio`).
        val_fraction: share of the images held out for evaluation.
        fold: which share is held out, counted from the end of the seeded order (cross-validation:
            with ``val_fraction=0.5``, folds 0 and 1 swap the halves).
        augment: random resized crops and flips for the training images.
        batch_size: images per step (per process under torchrun).
        seed: seeds the split, the shuffling and the training.
        out: save the fine-tuned patched model here (``tokenpatch.save`` format).
        config: the optimisation options.
        pretrained: load the model's published weights when there is no ``checkpoint``.
        runtime: the device the model trains and is evaluated on; evaluation also under its
            autocast and memory format (training in full precision).
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
    augment: bool = False
    batch_size: int = 32
    seed: int = 0
    out: Optional[str] = None
    config: FinetuneConfig = field(default_factory=FinetuneConfig)
    class_map: Optional[str] = None
    pretrained: bool = True
    runtime: Runtime = field(default_factory=Runtime)


@dataclass
class HeldOut:
    """Validation images, their labels (or None), the unpatched model's logits on them, and the
    runtime the evaluations run with."""

    images: Tensor
    labels: Optional[Tensor]
    reference: Tensor
    runtime: Runtime = field(default_factory=Runtime)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Agreement with the unpatched top-1 (and top-1 when labelled), in percent."""
        return self.scores(predict(model, self.images, batch_size=32, runtime=self.runtime))

    def scores(self, logits: Tensor) -> dict[str, float]:
        """Agreement (and top-1 when labelled) of (M, classes) ``logits``, in percent."""
        result = accuracy(logits, self.labels if self.labels is not None else torch.zeros(len(logits), dtype=torch.long),
                          self.reference)
        scores = {"agreement": result.agreement}
        if self.labels is not None:
            scores["top1"] = result.top1
        return scores


def split_dataset(preprocessing: Preprocessing, data: str, labels: Optional[str], val_fraction: float, seed: int,
                  augment: bool = False, fold: int = 0, num_classes: Optional[int] = None,
                  class_map: Optional[str] = None) -> tuple[Subset, Subset]:
    """(train subset, validation subset) of the folder, labels in the model's ``num_classes`` (see
    :func:`~tokenpatch.data.image_dataset`); validation uses the model's evaluation transform,
    training too unless ``augment`` (then :func:`~tokenpatch.data.input_transform`'s training one).

    The images are put in a seeded order; the validation subset is its ``fold``-th share of
    ``val_fraction`` counted from the end, the training subset the rest.
    """
    evaluated = image_dataset(data, labels, input_transform(preprocessing), num_classes, class_map)
    trained = image_dataset(data, labels, input_transform(preprocessing, training=True), num_classes,
                            class_map) if augment else evaluated
    order = torch.randperm(len(evaluated), generator=torch.Generator().manual_seed(seed)).tolist()
    held = len(order) - int(round(len(order) * (1 - val_fraction)))
    if held == 0 or held == len(order):
        raise InvalidOptionError(f"--val-fraction {val_fraction} leaves an empty split of {len(order)} images")
    folds = len(order) // held
    if not 0 <= fold < folds:
        raise InvalidOptionError(f"--fold {fold} out of range: --val-fraction {val_fraction} makes folds 0..{folds - 1}")
    end = len(order) - fold * held
    return Subset(trained, order[:end - held] + order[end:]), Subset(evaluated, order[end - held:end])


def held_out(model: nn.Module, subset: Subset, runtime: Runtime = Runtime()) -> HeldOut:
    """Load the validation images and the unpatched model's logits on them."""
    images, labels = load_images(subset)
    with unpatched_behaviour(model):
        reference = predict(model, images, batch_size=32, runtime=runtime)
    return HeldOut(images, labels if (labels >= 0).all() else None, reference, runtime)


#: training folders up to this many images are decoded once and kept in memory when not augmented
#: (about 0.6 MB per 224 px image); larger ones are read from disk every epoch
REMEMBERED_IMAGES = 1024


def _loader(train: Dataset, batch_size: int, seed: int) -> DataLoader:
    """Shuffled batches; under torchrun each process gets its own shard (``batch_size`` per process)."""
    if in_process_group():
        sampler = DistributedSampler(train, shuffle=True, seed=seed)
        return DataLoader(train, batch_size=batch_size, sampler=sampler)
    return DataLoader(train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


def run(model: nn.Module, train: Dataset, val: HeldOut, config: FinetuneConfig, batch_size: int,
        seed: int) -> dict[str, Any]:
    """Fine-tune ``model`` on ``train`` and report before/after scores on ``val`` and the MACs."""
    before = val.evaluate(model.eval())
    loader = _loader(train, batch_size, seed)
    history = finetune(model, loader, config, evaluate=val.evaluate)
    macs = count_macs(model).total
    with unpatched_behaviour(model):
        macs_unpatched = count_macs(model).total
    after = {k: v for k, v in history[-1].items() if k in before}  # empty off rank 0, which alone evaluates
    with unpatched_behaviour(model):
        after_dense = val.evaluate(model) if is_main_process() else {}
    loop = {k: v for k, v in history[-1].items() if k.endswith("_img_s") or k == "seconds"}
    return {"unpatched": val.scores(val.reference), "before": before, "after": after, "after_dense": after_dense,
            "macs": macs, "macs_unpatched": macs_unpatched, "steps": history[-1]["step"], "loop": loop,
            "train_images": len(train), "val_images": len(val.images), "final_loss": history[-1]["loss"]}


def run_finetune_job(job: FinetuneJob) -> dict[str, Any]:
    """Patch, fine-tune and evaluate as ``job`` says; return the scores before/after, MACs and sizes."""
    join_process_group(job.runtime.device)
    torch.manual_seed(job.seed)
    _check_writable(job.out)
    loaded = load_model(job.model, job.checkpoint, pretrained=job.pretrained)
    model = job.runtime.place(loaded.patched(PatchRequest(job.method, job.keep_ratio, job.macs_ratio, job.options)))
    train, val = split_dataset(loaded.preprocessing, job.data, job.labels, job.val_fraction, job.seed, job.augment,
                               job.fold, classes_of(model), job.class_map)
    if not job.augment and len(train) <= REMEMBERED_IMAGES:
        train = RememberedItems(train)
    result = run(model, train, held_out(model, val, job.runtime), job.config, job.batch_size, job.seed)
    if job.out and is_main_process():
        save(model, job.out)
    return {"model": job.model, "weights": loaded.weights, "method": get_method_name(model),
            "keep_ratio": get_config(model).keep_ratio, "options": get_config(model).to_dict(),
            "world_size": world_size(), "augment": job.augment, "finetune_config": dataclasses.asdict(job.config),
            **result, "out": job.out}


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
