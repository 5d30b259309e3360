"""Accuracy of a model on a labelled image set, and agreement with a reference model."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import Tensor, nn

from ..backends import find_backend
from ..progress import progress_bar
from .allocator import trimming
from .runtime import Runtime


def logits_of(model: nn.Module, output: Any) -> Tensor:
    """The (B, classes) logits in ``model``'s output (its backend knows where they are)."""
    return find_backend(model).logits(output)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode while the context is open; its train/eval mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch_size: int = 50, progress: bool = False, desc: str = "eval",
            runtime: Optional[Runtime] = None) -> Tensor:
    """Logits of ``model`` on (M, 3, H, W) ``images``, in eval mode, batch by batch: (M, classes),
    float32 on the CPU. Each batch goes to ``runtime``'s device and runs under its autocast (the
    model must already be there: :meth:`Runtime.place`); without one, where the images are."""
    model.eval()
    runtime = runtime or Runtime(images.device)
    logits = []
    for batch in progress_bar(images.split(batch_size), desc=desc, show=progress, leave=False):
        with runtime.autocast():
            logits.append(logits_of(model, model(runtime.inputs(batch))).float().cpu())
    return torch.cat(logits)


@torch.no_grad()
def streamed_top1(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                  runtime: Optional[Runtime] = None) -> tuple[Tensor, Tensor]:
    """(M,) top-1 class of ``model`` (eval mode) and (M,) labels over (images, labels) ``batches``,
    each batch run on ``runtime``'s device under its autocast: only the predictions are kept, so
    memory does not grow with the images."""
    model.eval()
    runtime = runtime or Runtime()
    predicted, labels = [], []
    for images, batch_labels in trimming(batches):
        with runtime.autocast():
            predicted.append(logits_of(model, model(runtime.inputs(images))).argmax(1).cpu())
        labels.append(torch.as_tensor(batch_labels))
    return torch.cat(predicted), torch.cat(labels)


@dataclass(frozen=True)
class Accuracy:
    """Top-1/top-5 accuracy in percent, and top-1 agreement with a reference (percent, or None)."""

    top1: float
    top5: float
    agreement: Optional[float] = None


def accuracy(logits: Tensor, labels: Tensor, reference_logits: Optional[Tensor] = None) -> Accuracy:
    """Accuracy of (M, classes) ``logits`` against (M,) ``labels``.

    ``agreement`` is the share of samples whose top-1 matches the reference's top-1 (no labels
    needed).
    """
    top5 = logits.topk(5, dim=1).indices
    top1 = top5[:, 0]
    agreement = None
    if reference_logits is not None:
        agreement = 100.0 * (top1 == reference_logits.argmax(1)).float().mean().item()
    return Accuracy(
        top1=100.0 * (top1 == labels).float().mean().item(),
        top5=100.0 * (top5 == labels[:, None]).any(1).float().mean().item(),
        agreement=agreement,
    )
