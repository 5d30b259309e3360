"""What a patched model computed, as maps over the patch grid, and attention baselines.

:func:`explain` runs a patched model on a batch and turns its trace into per-image,
per-block maps: which patches each block's MLP computed, the scores the method computed
(``iared2``'s keep probabilities), and one importance ranking of the patches. The baselines
:func:`cls_attention_map` and :func:`attention_rollout` (Abnar and Zuidema, ACL 2020) explain an
unpatched model by its attention, for comparison (``benchmarks/explain_deletion.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torchvision
from torch import Tensor, nn

from ..backends import find_backend
from ..core.pieces import attention_logits
from ..core.records import Trace
from ..core.registry import METHODS
from ..core.runner import context_of, is_patched, overriding, trace
from ..errors import TokenPatchError
from ..measure.evaluate import eval_mode, predict


@dataclass
class Explanation:
    """Token decisions of a patched model on a batch of B images, over the (gh, gw) patch grid.

    Attributes:
        computed: (B, depth, gh, gw) bool, True where the block's MLP ran on that patch (a
            fused token (evit) counts for none; a merged token (tome) for the one patch whose
            position it carries, see ``groups``).
        scores: block -> (B, gh, gw) per-patch scores the method computed before or in that
            block (``iared2``: keep probabilities); NaN where a patch was no longer there.
        score_name: what ``scores`` hold (e.g. ``"keep_probability"``), or None when the method
            records none.
        groups: for merging methods (``tome``), (B, depth, gh, gw) int64: after each block, the
            index of the token each patch was merged into (patches with equal values form one
            token); None for methods that do not merge.
        logits: (B, classes) the patched model's outputs on the images it explained; None for a
            model without a classifier head.
    """

    computed: Tensor
    scores: dict[int, Tensor] = field(default_factory=dict)
    score_name: Optional[str] = None
    groups: Optional[Tensor] = None
    logits: Optional[Tensor] = None

    @property
    def grid(self) -> tuple[int, int]:
        """(gh, gw) patches per column and row."""
        return tuple(self.computed.shape[-2:])

    def to_cpu(self) -> "Explanation":
        """The same maps on the CPU, in float32 where they are floating point (for drawing)."""
        return Explanation(self.computed.cpu(), {block: s.float().cpu() for block, s in self.scores.items()},
                           self.score_name, None if self.groups is None else self.groups.cpu(),
                           None if self.logits is None else self.logits.float().cpu())

    def importance(self) -> Tensor:
        """(B, gh, gw) patch ranking: blocks that computed the patch, ties broken by the last score.

        A patch kept longer ranks higher; among patches dropped at the same point, the one the
        method scored higher at its last look ranks higher (scores enter as within-image ranks
        in [0, 1), so their scale does not matter).
        """
        importance = self.computed.sum(dim=1).to(torch.float32)
        for block in sorted(self.scores):  # later scores overwrite earlier ones where present
            values = self.scores[block].flatten(1)
            ranks = values.nan_to_num(float("-inf")).argsort(dim=1).argsort(dim=1).to(torch.float32)
            ranks = (ranks / values.shape[1]).view_as(self.scores[block])
            seen = ~self.scores[block].isnan()
            importance = torch.where(seen, self.computed.sum(dim=1) + ranks, importance)
        return importance

    def stage_blocks(self) -> list[int]:
        """The blocks where the set of computed patches changes (block 0 always)."""
        changes = (self.computed[:, 1:] != self.computed[:, :-1]).flatten(2).any(dim=2).any(dim=0)
        return [0] + [i + 1 for i in changes.nonzero().flatten().tolist()]


def _grid(patches: int, height: int, width: int) -> tuple[int, int]:
    rows = round(math.sqrt(patches * height / width))
    if rows < 1 or patches % rows:
        raise TokenPatchError(f"cannot lay {patches} patches on a grid for {height}x{width} images")
    return rows, patches // rows


def _patch_map(positions: Tensor, values: Tensor, num_prefix: int, patches: int, fill: float) -> Tensor:
    """(B, M) original positions (< P: not a patch) and (B, M) values -> (B, patches) map."""
    out = values.new_full((positions.shape[0], patches), fill)
    real = positions >= num_prefix
    rows = torch.arange(positions.shape[0], device=positions.device).unsqueeze(1).expand_as(positions)
    out[rows[real], positions[real] - num_prefix] = values[real]
    return out


def _computed(recorded: Trace, num_prefix: int, patches: int) -> Tensor:
    """(B, depth, patches) bool from the trace's per-block positions (padding excluded)."""
    maps = []
    for record in recorded.records:
        positions = record.positions
        if record.counts is not None:
            padding = torch.arange(positions.shape[1], device=positions.device) >= record.counts.unsqueeze(1)
            positions = positions.masked_fill(padding, -1)
        ones = torch.ones_like(positions, dtype=torch.float32)
        maps.append(_patch_map(positions, ones, num_prefix, patches, 0.0).bool())
    return torch.stack(maps, dim=1)


def _groups(recorded: Trace, patches: int) -> Optional[Tensor]:
    """(B, depth, patches) merge groups from the trace, or None when no block merged."""
    if all(r.groups is None for r in recorded.records):
        return None
    batch = recorded.records[0].positions.shape[0]
    unmerged = torch.arange(patches).expand(batch, patches)
    return torch.stack([unmerged if r.groups is None else r.groups.cpu() for r in recorded.records], dim=1)


@torch.no_grad()
def explain(model: nn.Module, images: Tensor) -> Explanation:
    """Maps of what a patched model computed on ``images`` (B, 3, H, W), in eval mode.

    Raises:
        NotPatchedError: if ``model`` is not patched.
    """
    ctx = context_of(model)
    with eval_mode(model), trace(model) as recorded:
        logits = find_backend(model).logits(model(images))
    patches = recorded.input_tokens - ctx.num_prefix
    rows, cols = _grid(patches, images.shape[-2], images.shape[-1])
    batch = images.shape[0]
    computed = _computed(recorded, ctx.num_prefix, patches).view(batch, -1, rows, cols)
    scores = {
        s.block: _patch_map(s.positions, s.values.float(), ctx.num_prefix, patches, float("nan")).view(batch, rows, cols)
        for s in recorded.scores
    }
    groups = _groups(recorded, patches)
    classified = isinstance(logits, Tensor) and logits.ndim == 2
    return Explanation(computed, scores, recorded.scores[0].name if recorded.scores else None,
                       None if groups is None else groups.view(batch, -1, rows, cols),
                       logits.detach() if classified else None)


def score_map(model: nn.Module, images: Tensor) -> Tensor:
    """(B, gh, gw) the method's own per-patch scores, averaged over the blocks that score.

    The pass runs under the options the method names for this
    (``Method.explanation_options``), in which every scoring block sees every patch; for
    ``iared2`` this is the interpreters' heatmap, the mean keep probability over the groups
    (the IA-RED² explanation). The options are overridden for this call only.

    Raises:
        NotPatchedError; TokenPatchError when the method records no scores to map.
    """
    ctx = context_of(model)
    options = ctx.method.explanation_options(ctx.config)
    if options is None:
        raise TokenPatchError(f"{ctx.method.name!r} has no per-patch score map; methods with one: "
                              f"{', '.join(methods_with_score_maps())}")
    with overriding(model, **options):
        scores = explain(model, images).scores
    return torch.stack(list(scores.values())).mean(dim=0)


def methods_with_score_maps() -> list[str]:
    """Registered methods whose scores explain every patch (:func:`score_map`)."""
    return sorted(name for name, m in METHODS.items() if m.explanation_options(m.config_class()) is not None)


@torch.no_grad()
def attention_maps(model: nn.Module, images: Tensor) -> Tensor:
    """Head-averaged attention probabilities of every block of an unpatched model.

    Args:
        images: (B, 3, H, W).

    Returns:
        (B, depth, N, N) attention of every token (rows: queries) over every token.
    """
    if is_patched(model):
        raise TokenPatchError("attention_maps explains the unpatched model; call it on an unpatched model (or a copy)")
    backend = find_backend(model)
    maps: list[Tensor] = []

    def capture(block: nn.Module, args: tuple, kwargs: dict) -> None:
        x, extra = backend.block_input(args, dict(kwargs))
        view = backend.view(block, extra)
        q, k, _ = view.qkv(view.norm1(x))
        maps.append(attention_logits(view, q, k).softmax(dim=-1).mean(dim=1))

    handles = [b.register_forward_pre_hook(capture, with_kwargs=True) for b in backend.blocks(model)]
    try:
        with eval_mode(model):
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(maps, dim=1)


def _to_grid(cls_row: Tensor, num_prefix: int, images: Tensor) -> Tensor:
    patches = cls_row.shape[1] - num_prefix
    return cls_row[:, num_prefix:].reshape(-1, *_grid(patches, images.shape[-2], images.shape[-1]))


def cls_attention_map(model: nn.Module, images: Tensor, block: int = -1) -> Tensor:
    """(B, gh, gw) class-token attention over the patches in one block (default the last) of an unpatched model."""
    maps = attention_maps(model, images)
    return _to_grid(maps[:, block, 0], find_backend(model).num_prefix_tokens(model), images)


def attention_rollout(model: nn.Module, images: Tensor) -> Tensor:
    """(B, gh, gw) attention rollout of an unpatched model (Abnar and Zuidema, ACL 2020).

    Each block's head-averaged attention is mixed half-and-half with the identity (the residual),
    rows renormalised, and the blocks multiplied in order; the class token's row over the
    patches is the map.
    """
    maps = attention_maps(model, images)
    eye = torch.eye(maps.shape[-1], dtype=maps.dtype, device=maps.device)
    rollout = eye.expand_as(maps[:, 0])
    for layer in maps.unbind(dim=1):
        mixed = 0.5 * layer + 0.5 * eye
        rollout = (mixed / mixed.sum(dim=-1, keepdim=True)) @ rollout
    return _to_grid(rollout[:, 0], find_backend(model).num_prefix_tokens(model), images)



@torch.no_grad()
def deletion_curve(model: nn.Module, images: Tensor, importance: Tensor, steps: int = 14,
                   batch_size: int = 50) -> Tensor:
    """How fast a model loses confidence as the most important patches are deleted first.

    The deletion metric (Petsiuk et al., BMVC 2018): patches are removed in order of
    ``importance`` (highest first) in ``steps`` equal portions; a removed patch's pixels are set
    to 0, the dataset mean of normalised inputs. A good explanation makes the curve fall fast;
    its mean (:func:`curve_auc`) is then low.

    Args:
        model: the classifier whose prediction is explained (usually unpatched).
        images: (B, 3, H, W) normalised images.
        importance: (B, gh, gw) per-patch importance.

    Returns:
        (B, steps + 1) probability of each image's originally predicted class, from nothing to
        everything deleted.
    """
    return _probability_curve(model, images, torch.zeros_like(images), importance, steps, batch_size, intact_step=0)


@torch.no_grad()
def insertion_curve(model: nn.Module, images: Tensor, importance: Tensor, steps: int = 14,
                    batch_size: int = 50, blur_sigma: float = 5.0) -> Tensor:
    """How fast a model gains confidence as the most important patches are inserted first.

    The insertion metric (Petsiuk et al., BMVC 2018): the pass starts from a blurred copy of each
    image (Gaussian, ``blur_sigma`` pixels, kernel 11 as in RISE) and its patches are restored in
    order of ``importance`` (highest first) in ``steps`` equal portions. A good explanation
    makes the curve rise fast; its area (:func:`curve_auc`) is then high.

    Args:
        model: the classifier whose prediction is explained (usually unpatched).
        images: (B, 3, H, W) normalised images.
        importance: (B, gh, gw) per-patch importance.

    Returns:
        (B, steps + 1) probability of each image's originally predicted class (on the intact
        image), from the blurred image to the intact one.
    """
    blurred = torchvision.transforms.functional.gaussian_blur(images, kernel_size=11, sigma=blur_sigma)
    return _probability_curve(model, blurred, images, importance, steps, batch_size, intact_step=steps)


def _probability_curve(model: nn.Module, start: Tensor, end: Tensor, importance: Tensor, steps: int,
                       batch_size: int, intact_step: int) -> Tensor:
    """(B, steps + 1) probability of the class predicted on the intact images while the patches of
    ``start`` turn into those of ``end`` in order of ``importance`` (B, gh, gw), highest first.
    The pass of step ``intact_step`` (the first or the last) is the intact images' own, so it
    gives the predicted class without an extra pass."""
    batch, rows, cols = importance.shape
    order = importance.flatten(1).argsort(dim=1, descending=True)
    probabilities = []
    for step in range(steps + 1):
        count = round(step * rows * cols / steps)
        changed = torch.zeros(batch, rows * cols, dtype=torch.bool).scatter_(1, order[:, :count], True)
        pixel_mask = torch.nn.functional.interpolate(changed.view(batch, 1, rows, cols).float(),
                                                     size=start.shape[-2:], mode="nearest").bool()
        probabilities.append(predict(model, torch.where(pixel_mask, end, start), batch_size).softmax(dim=1))
    predicted = probabilities[intact_step].argmax(dim=1, keepdim=True)
    return torch.stack([p.gather(1, predicted).squeeze(1) for p in probabilities], dim=1)


def curve_auc(curve: Tensor) -> Tensor:
    """(B,) area under (B, S + 1) deletion or insertion curves over a changed share from 0 to 1 (trapezoid rule)."""
    return torch.trapezoid(curve, dx=1.0 / (curve.shape[1] - 1), dim=1)
