"""The ``tokenpatch eval`` job: MACs, accuracy and agreement of several methods on an image folder.

Every method (with its own options) is patched onto a copy of the same model, optionally fitted
to a share of the unpatched MACs on the first images, and run on every batch right after the
unpatched model, so the agreement column needs no labels and memory does not grow with the
folder: images stream through a ``DataLoader`` and only per-method counts are kept. Under
``torchrun`` each process scores its own share of the images and the counts are summed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..api import get_config, patch, set_macs_ratio
from ..backends import find_backend
from ..core.distributed import in_process_group, rank, world_size
from ..core.options import parse_options
from ..core.registry import get_method
from ..errors import InvalidOptionError, TokenPatchError
from ..measure.allocator import trimming
from ..measure.budget import mean_macs_per_image
from ..measure.evaluate import logits_of
from ..measure.runtime import Runtime
from ..progress import progress_bar
from .models import lift_keep_ratio

EVAL_COLUMNS = ["method", "keep_ratio", "gmacs", "macs_ratio", "top1", "top5", "agreement"]
#: MACs of a method whose token counts follow the image are the mean over this many first images
MAC_IMAGES = 8


@dataclass(frozen=True)
class MethodSpec:
    """A method and its options as the command line names them: ``idle`` or ``idle:score=fixed,ranking=softmax``."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    #: an already patched model of this method (from a tokenpatch checkpoint), evaluated instead of a patched copy
    model: Optional[nn.Module] = field(default=None, compare=False, repr=False)

    @classmethod
    def parse(cls, text: str) -> "MethodSpec":
        """Read ``NAME[:KEY=VALUE,...]``; values by the option's declared type (one-line errors)."""
        name, _, rest = text.partition(":")
        pairs = []
        for item in filter(None, rest.split(",")):
            key, sep, value = item.partition("=")
            if not sep or not key.isidentifier():
                raise InvalidOptionError(f"method options are KEY=VALUE pairs separated by commas, "
                                         f"got {item!r} in {text!r}")
            pairs.append((key, value))
        return cls(name, parse_options(get_method(name).config_class, pairs), text)


def shard(dataset: Dataset) -> Dataset:
    """This process's share of ``dataset`` under ``torch.distributed``: every ``world``-th item from
    its rank, so each item is scored by exactly one process and none is repeated as padding (a
    ``DistributedSampler`` pads); the whole dataset in a single process."""
    if not in_process_group():
        return dataset
    return Subset(dataset, range(rank(), len(dataset), world_size()))


def in_batches(images: Tensor, labels: Tensor, batch_size: int = 50) -> Iterator[tuple[Tensor, Tensor]]:
    """(images, labels) batches of (M, 3, H, W) ``images`` and (M,) ``labels`` already in memory."""
    return zip(images.split(batch_size), labels.split(batch_size))


def eval_loader(dataset: Dataset, batch_size: int, workers: int, runtime: Runtime) -> DataLoader:
    """Batches of (images, labels) of this process's share of ``dataset``, in order, decoded by
    ``workers`` processes (0: in this one), pinned when they go to a GPU."""
    return DataLoader(shard(dataset), batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=runtime.pin_memory, persistent_workers=False)


class Tally:
    """Running counts of one model's scores: images, labelled images, top-1 and top-5 hits, and
    top-1 agreements with the reference, summed over batches (and processes)."""

    FIELDS = ("images", "labelled", "top1", "top5", "agreement")

    def __init__(self) -> None:
        self.counts = torch.zeros(len(self.FIELDS), dtype=torch.float64)

    def add(self, top5: Tensor, labels: Tensor, reference_top1: Tensor) -> None:
        """Count a batch: (B, 5) best classes (:func:`top5_of`), (B,) ``labels`` (-1 unknown), (B,) reference top-1."""
        known = labels >= 0
        hits = top5 == labels[:, None]
        self.counts += torch.tensor([len(labels), known.sum(), hits[:, 0].sum(), hits.any(1).sum(),
                                     (top5[:, 0] == reference_top1).sum()], dtype=torch.float64)

    def percent(self, name: str) -> float:
        return 100.0 * self.counts[self.FIELDS.index(name)].item() / max(self.counts[0].item(), 1.0)


def top5_of(logits: Tensor) -> Tensor:
    """(B, 5) indices of the best classes of (B, classes) ``logits``, best first, on the CPU (one
    ranking for top-1, top-5 and agreement, so ties in half precision are broken alike)."""
    return logits.float().topk(min(5, logits.shape[1]), dim=1).indices.cpu()


@dataclass
class _Contender:
    """A model being scored: its row label, its MACs per image and its running counts."""

    label: str
    model: nn.Module
    tally: Tally = field(default_factory=Tally)
    macs: float = 0.0


def evaluation_rows(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], methods: Sequence[MethodSpec],
                    first_images: Tensor, keep_ratio: Optional[float] = None, macs_ratio: Optional[float] = None,
                    calibration: int = 16, mac_images: int = MAC_IMAGES, runtime: Runtime = Runtime(),
                    progress: bool = True) -> list[dict[str, Any]]:
    """One row for the unpatched ``model``, then one per method, scored batch by batch.

    Args:
        batches: (images (B, 3, H, W), labels (B,), -1 where unknown) of this process's share of the
            images (see :func:`eval_loader`); under ``torch.distributed`` the counts of all
            processes are summed, so every process returns the same rows.
        first_images: (M, 3, H, W), the first images of the whole set (the same in every process):
            MACs are counted on them and ``macs_ratio`` is fitted on them.
        keep_ratio: every method's keep ratio (None: each method's default; a spec's own ``model``
            keeps its ratio), or
        macs_ratio: the share of the unpatched MACs each method is fitted to, counted on the
            first ``calibration`` images (per-image counts vary for some methods).
        mac_images: MACs are the mean over this many first images, counted one by one.
        runtime: device, autocast and memory format the models run with.

    Returns:
        Rows with ``method``, ``keep_ratio``, ``gmacs``, ``macs_ratio``, ``top1``/``top5`` (None
        unless every image is labelled), ``agreement`` with the unpatched top-1 (percent) and
        ``images`` (how many were scored, over all processes); a
        method that cannot reach ``macs_ratio`` gets a row with only a ``note`` saying how near it came.
    """
    if keep_ratio is not None and macs_ratio is not None:
        raise InvalidOptionError("give keep_ratio or macs_ratio, not both")
    runtime.place(model.eval())
    first_images = runtime.inputs(first_images)
    reference = _Contender("unpatched", model, macs=mean_macs_per_image(model, first_images[:1]))
    contenders, notes = [], {}
    for spec in methods:
        label = spec.label or spec.name
        try:
            contenders.append(_prepare(model, spec, label, keep_ratio, macs_ratio, first_images[:calibration],
                                       first_images[:mac_images], runtime))
        except InvalidOptionError as exc:  # e.g. ats: its sampler drops more than the budget allows
            notes[label] = str(exc)
    _score(reference, contenders, batches, runtime, progress)
    rows = [_row(reference, reference, None)]
    for spec in methods:
        label = spec.label or spec.name
        if label in notes:
            rows.append({"method": label, "note": notes[label]})
        else:
            contender = next(c for c in contenders if c.label == label)
            rows.append(_row(contender, reference, get_config(contender.model).keep_ratio))
    return rows


def _prepare(model: nn.Module, spec: MethodSpec, label: str, keep_ratio: Optional[float],
             macs_ratio: Optional[float], calibration_images: Tensor, mac_images: Tensor,
             runtime: Runtime) -> _Contender:
    """``spec``'s patched model on the device, fitted to ``macs_ratio`` if given, with its MACs counted."""
    if spec.model is None:
        keep_ratio, options = lift_keep_ratio(keep_ratio, macs_ratio, spec.options)
        patched = patch(copy.deepcopy(model), spec.name, keep_ratio=keep_ratio, **options)
    else:
        patched = spec.model
    runtime.place(patched.eval())
    if macs_ratio is not None:
        set_macs_ratio(patched, macs_ratio, calibration_images)
    fixed = get_method(spec.name).fixed_token_counts(get_config(patched))
    return _Contender(label, patched, macs=mean_macs_per_image(patched, mac_images[: 1 if fixed else None]))


@torch.inference_mode()
def _score(reference: _Contender, contenders: Sequence[_Contender], batches: Iterable[tuple[Tensor, Tensor]],
           runtime: Runtime, progress: bool) -> None:
    """Run every model on every batch, the unpatched one first, and count; then sum over processes."""
    for images, labels in progress_bar(trimming(batches), desc="eval", show=progress, leave=False):
        images = runtime.inputs(images)
        with runtime.autocast():
            reference_top5 = top5_of(logits_of(reference.model, reference.model(images)))
            reference.tally.add(reference_top5, labels, reference_top5[:, 0])
            for contender in contenders:
                contender.tally.add(top5_of(logits_of(contender.model, contender.model(images))), labels,
                                    reference_top5[:, 0])
    if in_process_group():
        counts = torch.stack([c.tally.counts for c in (reference, *contenders)]).to(runtime.device)  # nccl: on the GPU
        torch.distributed.all_reduce(counts)  # float64 sums of counts are exact
        for contender, summed in zip((reference, *contenders), counts.cpu()):
            contender.tally.counts = summed


def _row(contender: _Contender, reference: _Contender, keep_ratio: Optional[float]) -> dict[str, Any]:
    tally = contender.tally
    labelled = tally.counts[1].item() == tally.counts[0].item() > 0
    return {"method": contender.label, "keep_ratio": keep_ratio, "gmacs": contender.macs / 1e9,
            "macs_ratio": contender.macs / reference.macs,
            "top1": tally.percent("top1") if labelled else None, "top5": tally.percent("top5") if labelled else None,
            "agreement": tally.percent("agreement"), "images": int(tally.counts[0].item())}


def classes_of(model: nn.Module) -> int:
    """How many classes ``model``'s classifier scores (its label space).

    Raises:
        TokenPatchError: the model has no classifier (an encoder), in one line.
    """
    head = find_backend(model).head(model)
    classes = head.out_features if isinstance(head, nn.Linear) else getattr(model, "num_classes", 0)
    if not classes:
        raise TokenPatchError(f"{type(model).__name__} has no classifier to score images with (an encoder); "
                              "eval and finetune need an image classifier")
    return classes
