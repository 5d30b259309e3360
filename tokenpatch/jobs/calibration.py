"""Calibrated schedules: search the per-block merge schedule that best keeps the unpatched outputs.

The per-block reduction rates matter as much as the rule that picks tokens (DiffRate, Chen et al.,
ICCV 2023, ``OpenGVLab/DiffRate``, learns them by gradient descent with the weights frozen). Here
a search does it on a CPU in minutes, with no weight update and no labels: for ``tome``, the
schedule is the share of the patches left after each block, drawn from a family

    share(l) = 1                                        for l < start
    share(l) = 1 - (1 - final) * ((l - start + 1) / (depth - start)) ** shape     otherwise

For every ``start`` in the first half of the blocks and every ``shape`` (front-loaded below 1,
back-loaded above), ``final`` is solved so that the MACs meet the budget (from a per-block cost
model fitted to fvcore counts), and the candidate is scored by the mean KL divergence of its
predictions from the unpatched model's on the user's images. The best schedule is checked with
fvcore, nudged onto the budget, and set on the model as its ``remaining`` option, which
``tokenpatch.save`` stores, so it loads back without recalibrating.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..api import get_method_name, is_patched, patch, unpatch
from ..core.runner import context_of, overriding, reconfigure
from ..errors import InvalidOptionError
from ..measure.budget import TOLERANCE, check_macs_ratio, set_macs_ratio
from ..measure.evaluate import predict
from ..measure.flops import count_macs

#: exponents of the schedule family: < 1 merges early, > 1 late
SHAPES = (0.5, 0.75, 1.0, 1.5, 2.0)


@dataclass(frozen=True)
class Calibration:
    """What :func:`calibrate` chose and how it measured on the calibration images.

    Attributes:
        remaining: per block, the share of the patches left after it (set on the model).
        macs_ratio: its MACs over the unpatched MACs (fvcore).
        agreement: top-1 agreement with the unpatched model, percent.
        kl: mean KL divergence from the unpatched predictions.
        default_agreement, default_kl: the same for tome's default schedule at the same budget.
        candidates: schedules scored.
    """

    remaining: tuple[float, ...]
    macs_ratio: float
    agreement: float
    kl: float
    default_agreement: float
    default_kl: float
    candidates: int


def calibrate(model: nn.Module, images: Tensor, macs_ratio: float = 0.65, progress: bool = True) -> Calibration:
    """Patch ``model`` with ``tome`` (unless it is already) on the schedule that keeps it closest to
    the unpatched model at ``macs_ratio`` of the MACs, found on (B, 3, H, W) ``images``.

    A few dozen unlabelled images of the user's domain are enough (32 take about a minute for a
    DeiT-Tiny on two CPU cores). The model keeps its other ``tome`` options.

    Returns:
        The :class:`Calibration`; the model is left patched with the chosen ``remaining``.

    Raises:
        InvalidOptionError: the model is patched with another method, or the budget is out of range.
    """
    target = check_macs_ratio(macs_ratio)
    if is_patched(model):
        if get_method_name(model) != "tome":
            raise InvalidOptionError(f"calibrate searches tome's merge schedule; this model is patched with "
                                     f"{get_method_name(model)!r} (unpatch it first)")
        return _search(model, images, target, progress)
    patch(model, "tome")
    try:
        return _search(model, images, target, progress)
    except BaseException:
        unpatch(model)  # a failed calibration leaves the model as it came
        raise


def _search(model: nn.Module, images: Tensor, target: float, progress: bool) -> Calibration:
    """:func:`calibrate` on a ``tome``-patched model."""
    reconfigure(model, remaining=None)
    depth = context_of(model).facts.depth
    costs = _BlockCosts.fit(model, images[:1])
    with overriding(model, keep_ratio=1.0):
        reference = predict(model, images).log_softmax(dim=-1)
    set_macs_ratio(model, target, images[:1])  # tome's default schedule at the budget, for comparison
    default_kl, default_agreement = _score(model, images, reference, None)
    family = [_solve(costs, target, start, shape, depth) for start in range(depth // 2 + 1) for shape in SHAPES]
    # a late start cannot always reach the budget (a block merges at most half of its patches)
    candidates = [schedule for schedule in family if costs.ratio(schedule) <= target * (1 + TOLERANCE)]
    scored = [(_score(model, images, reference, schedule)[0], schedule)
              for schedule in tqdm(candidates, desc="calibrating", disable=not progress, leave=False)]
    best = _on_budget(model, min(scored)[1], target, images[:1], costs)
    reconfigure(model, remaining=best)
    kl, agreement = _score(model, images, reference, None)
    ratio = count_macs(model, images[:1]).total / costs.unpatched
    return Calibration(best, ratio, agreement, kl, default_agreement, default_kl, len(candidates))


def schedule_family(start: int, shape: float, final: float, depth: int) -> tuple[float, ...]:
    """Per block, the share of the patches left: 1 before ``start``, then falling to ``final`` at
    the last block along ``((l - start + 1) / (depth - start)) ** shape``."""
    return tuple(1.0 if block < start else 1.0 - (1.0 - final) * ((block - start + 1) / (depth - start)) ** shape
                 for block in range(depth))


@dataclass(frozen=True)
class _BlockCosts:
    """A least-squares model of one block's MACs from its attention tokens n and MLP tokens m:
    ``a n^2 + b n + c m + d [m < n]``, fitted to fvcore's per-block counts."""

    weights: Tensor
    prefix: int
    patches: int
    other: float  # MACs outside the blocks
    unpatched: float

    @classmethod
    def fit(cls, model: nn.Module, image: Tensor) -> "_BlockCosts":
        rows, costs = [], []
        with overriding(model, keep_ratio=1.0):
            dense = count_macs(model, image)
        tokens = dense.tokens_per_block[0]
        for keep in (0.8, 0.6, 0.45, 1.0):
            with overriding(model, keep_ratio=keep):
                report = count_macs(model, image) if keep < 1.0 else dense
            attention = [tokens] + report.tokens_per_block[:-1]  # a block attends over what the last one left
            for n, m, cost in zip(attention, report.tokens_per_block, report.per_block):
                rows.append([n * n, n, m, float(m < n)])
                costs.append(float(cost))
        weights = torch.linalg.lstsq(torch.tensor(rows, dtype=torch.float64),
                                     torch.tensor(costs, dtype=torch.float64).unsqueeze(1)).solution.squeeze(1)
        prefix = context_of(model).facts.num_prefix
        return cls(weights, prefix, tokens - prefix, float(dense.total - sum(dense.per_block)), float(dense.total))

    def ratio(self, schedule: Sequence[float]) -> float:
        """Predicted MACs of ``schedule`` over the unpatched MACs, following tome's merge rule."""
        total, patches = self.other, self.patches
        for share in schedule:
            kept = max(patches - patches // 2, min(patches, max(1, round(share * self.patches))))
            n, m = patches + self.prefix, kept + self.prefix
            total += float(self.weights @ torch.tensor([n * n, n, m, float(m < n)], dtype=torch.float64))
            patches = kept
        return total / self.unpatched


def _solve(costs: _BlockCosts, target: float, start: int, shape: float, depth: int) -> tuple[float, ...]:
    """The member of the family at (``start``, ``shape``) whose predicted MACs meet ``target``
    (the cheapest member when none does)."""
    low, high = 0.0, 1.0
    for _ in range(30):
        middle = (low + high) / 2
        if costs.ratio(schedule_family(start, shape, middle, depth)) > target:
            high = middle
        else:
            low = middle
    return tuple(max(share, 1.0 / costs.patches) for share in schedule_family(start, shape, low, depth))


def _score(model: nn.Module, images: Tensor, reference: Tensor,
           schedule: Optional[tuple[float, ...]]) -> tuple[float, float]:
    """(mean KL from the unpatched predictions, top-1 agreement in percent) of ``schedule``."""
    if schedule is None:
        log_probs = predict(model, images).log_softmax(dim=-1)
    else:
        with overriding(model, remaining=schedule):
            log_probs = predict(model, images).log_softmax(dim=-1)
    kl = F.kl_div(log_probs, reference, log_target=True, reduction="batchmean").item()
    agreement = 100.0 * (log_probs.argmax(1) == reference.argmax(1)).float().mean().item()
    return kl, agreement


def _on_budget(model: nn.Module, schedule: tuple[float, ...], target: float, image: Tensor,
               costs: _BlockCosts) -> tuple[float, ...]:
    """``schedule`` with its merges scaled alike until fvcore counts ``target`` within the budget
    tolerance, or as near as a dozen counts get (the cost model is close, not exact)."""
    best, best_gap = schedule, math.inf
    low, high = 0.0, 2.0
    for _ in range(12):
        scale = (low + high) / 2
        scaled = tuple(min(1.0, max(1.0 / costs.patches, 1.0 - (1.0 - share) * scale)) for share in schedule)
        with overriding(model, remaining=scaled):
            ratio = count_macs(model, image).total / costs.unpatched
        if abs(ratio - target) < best_gap:
            best, best_gap = scaled, abs(ratio - target)
        if best_gap <= TOLERANCE * target:
            break
        low, high = (scale, high) if ratio > target else (low, scale)
    return best
