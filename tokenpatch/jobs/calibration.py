"""Calibration: the method and the per-block schedule that best keep the unpatched outputs at a budget.

The per-block reduction rates matter as much as the rule that picks tokens (DiffRate, Chen et al.,
ICCV 2023, ``OpenGVLab/DiffRate``, learns them by gradient descent with the weights frozen), and
which rule holds best depends on the model. Here a search does both on a CPU in minutes, with no
weight update and no labels, scoring every candidate by the mean KL divergence of its
predictions from the unpatched model's on the user's images:

- every training-free method (or those named) is fitted to the budget with its default options
  (:func:`~tokenpatch.measure.budget.set_macs_ratio`), or with each of the option sets it offers
  (``Method.calibration_options``: ``diffrate`` scales each of DiffRate's published schedules);
- for ``tome``, the schedule is also searched: the share of the patches left after each block,
  drawn from a family

    share(l) = 1                                        for l < start
    share(l) = 1 - (1 - final) * ((l - start + 1) / (depth - start)) ** shape     otherwise

  For every ``start`` in the first half of the blocks and every ``shape`` (front-loaded below 1,
  back-loaded above), ``final`` is solved so that the MACs meet the budget (from a per-block
  cost model fitted to fvcore counts); the best schedule is checked with fvcore and nudged onto
  the budget, and set as ``tome``'s ``remaining`` option.

The model is left patched with the best candidate, whose options ``tokenpatch.save`` stores, so it
loads back without recalibrating.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..api import get_config, get_method_name, is_patched, patch, unpatch
from ..core.blocks import check_images
from ..core.registry import get_method, training_free_methods
from ..core.runner import context_of, overriding, reconfigure
from ..errors import InvalidOptionError
from ..measure.budget import TOLERANCE, check_macs_ratio, set_macs_ratio
from ..measure.evaluate import predict
from ..measure.flops import count_macs
from ..progress import progress_bar

#: exponents of the schedule family: < 1 merges early, > 1 late
SHAPES = (0.5, 0.75, 1.0, 1.5, 2.0)


@dataclass(frozen=True)
class Candidate:
    """One method as :func:`calibrate` measured it at the budget on the calibration images.

    Attributes:
        method: its name.
        options: the options it ran with (the fitted keep ratio or schedule included); empty
            when it could not reach the budget.
        macs_ratio: its MACs over the unpatched MACs (fvcore; NaN when unreachable).
        agreement: top-1 agreement with the unpatched model, percent (NaN when unreachable).
        kl: mean KL divergence from the unpatched predictions (inf when unreachable).
        note: why it has no score, or ``""``.
    """

    method: str
    options: dict[str, Any]
    macs_ratio: float
    agreement: float
    kl: float
    note: str = ""


@dataclass(frozen=True)
class Calibration:
    """What :func:`calibrate` chose and how it measured on the calibration images.

    Attributes:
        method: the method chosen (set on the model).
        remaining: ``tome``'s per-block share of the patches left, when ``tome`` was chosen; else None.
        macs_ratio: its MACs over the unpatched MACs (fvcore).
        agreement: top-1 agreement with the unpatched model, percent.
        kl: mean KL divergence from the unpatched predictions.
        default_agreement, default_kl: the same for the chosen method with its default options
            at the same budget (for ``tome``, its default schedule).
        candidates: ``tome`` schedules scored (0 when ``tome`` was not searched).
        compared: every method tried, best first.
    """

    method: str
    remaining: Optional[tuple[float, ...]]
    macs_ratio: float
    agreement: float
    kl: float
    default_agreement: float
    default_kl: float
    candidates: int
    compared: tuple[Candidate, ...] = ()


def calibrate(model: nn.Module, images: Tensor, macs_ratio: float = 0.65, methods: Optional[Sequence[str]] = None,
              progress: bool = True) -> Calibration:
    """Patch ``model`` with the method (and, for ``tome``, the merge schedule) that keeps it closest
    to the unpatched model at ``macs_ratio`` of the MACs, found on (B, 3, H, W) ``images``.

    A few dozen unlabelled images of the user's domain are enough (32 take a few minutes for a
    DeiT-Tiny on two CPU cores with every method, about one with ``tome`` alone).

    Args:
        methods: the methods to choose among; None: every training-free method, or only the
            model's own method (keeping its other options) when it is patched already.

    Returns:
        The :class:`Calibration`; the model is left patched with the chosen method and options.

    Raises:
        InvalidOptionError: the budget is out of range, a named method needs training, the
            model is patched with a method not named, or no method reaches the budget;
            :class:`~tokenpatch.errors.InputShapeError` for ``images`` that are not (B, C, H, W).
            The model is then left as it came.
    """
    target = check_macs_ratio(macs_ratio)
    check_images(images)
    names = _methods_to_try(model, methods)
    original = (get_method_name(model), _options(model)) if is_patched(model) else None
    kept = {k: v for k, v in original[1].items() if k not in ("keep_ratio", "remaining")} if original else {}
    try:
        if original:
            unpatch(model)
        reference = predict(model, images).log_softmax(dim=-1)
        unpatched = count_macs(model, images[:1]).total
        return _choose(model, images, target, names, kept, reference, unpatched, progress)
    except BaseException:  # a failed calibration leaves the model as it came
        if is_patched(model):
            unpatch(model)
        if original:
            patch(model, original[0], **original[1])
        raise


def _options(model: nn.Module) -> dict[str, Any]:
    """The options of a patched model, as ``patch`` takes them."""
    return dataclasses.asdict(get_config(model))


def _methods_to_try(model: nn.Module, methods: Optional[Sequence[str]]) -> list[str]:
    """The method names :func:`calibrate` compares, checked."""
    if methods is None:
        return [get_method_name(model)] if is_patched(model) else training_free_methods()
    names = list(dict.fromkeys(methods))
    if not names:
        raise InvalidOptionError("calibrate needs at least one method to try")
    for name in names:
        if get_method(name).needs_training:
            raise InvalidOptionError(f"calibrate compares training-free methods; {name!r} learns its policy: "
                                     "fine-tune it first (tokenpatch finetune) and fit it with set_macs_ratio")
    if is_patched(model) and get_method_name(model) not in names:
        raise InvalidOptionError(f"this model is patched with {get_method_name(model)!r}, which is not among "
                                 f"{names}; unpatch it first")
    return names


def _choose(model: nn.Module, images: Tensor, target: float, names: list[str], kept: dict[str, Any],
            reference: Tensor, unpatched: float, progress: bool) -> Calibration:
    """Score every method in ``names`` at the budget, then patch ``model`` with the best one."""
    compared, tome_search = [], None
    for name in progress_bar(names, desc="calibrating", show=progress, leave=False):
        tried = []
        for options in get_method(name).calibration_options(get_method(name).config_class(**kept)):
            patch(model, name, **{**kept, **options})
            try:
                if name == "tome":
                    tome_search = _search_tome(model, images, target, reference, progress)
                tried.append(_fitted(model, images, target, reference, unpatched))
            except InvalidOptionError as exc:  # these options cannot reach the budget on this model
                tried.append(Candidate(name, {}, math.nan, math.nan, math.inf, str(exc)))
            finally:
                unpatch(model)
        compared.append(min(tried, key=lambda c: c.kl))
    compared.sort(key=lambda c: c.kl)
    best = compared[0]
    if not best.options:
        raise InvalidOptionError(f"no method reaches macs_ratio={target}: " + "; ".join(c.note for c in compared))
    patch(model, best.method, **best.options)
    default_kl, default_agreement = (tome_search[1] if best.method == "tome" and tome_search
                                     else (best.kl, best.agreement))
    return Calibration(best.method, best.options.get("remaining") if best.method == "tome" else None,
                       best.macs_ratio, best.agreement, best.kl, default_agreement, default_kl,
                       tome_search[0] if tome_search else 0, tuple(compared))


def _fitted(model: nn.Module, images: Tensor, target: float, reference: Tensor, unpatched: float) -> Candidate:
    """The patched ``model`` on the budget (a ``tome`` schedule is already on it), scored."""
    if get_method_name(model) != "tome" or get_config(model).remaining is None:
        set_macs_ratio(model, target, images[:8])
    kl, agreement = _score(model, images, reference, None)
    return Candidate(get_method_name(model), _options(model), count_macs(model, images[:1]).total / unpatched,
                     agreement, kl)


def _search_tome(model: nn.Module, images: Tensor, target: float, reference: Tensor,
                 progress: bool) -> tuple[int, tuple[float, float]]:
    """Set the best ``tome`` schedule of the family on the ``tome``-patched ``model``.

    Returns:
        The number of schedules scored and (KL, agreement) of tome's default schedule at the budget.
    """
    reconfigure(model, remaining=None)
    depth = context_of(model).facts.depth
    costs = _BlockCosts.fit(model, images[:1])
    set_macs_ratio(model, target, images[:1])  # tome's default schedule at the budget, for comparison
    default = _score(model, images, reference, None)
    family = [_solve(costs, target, start, shape, depth) for start in range(depth // 2 + 1) for shape in SHAPES]
    # a late start cannot always reach the budget (a block merges at most half of its patches)
    candidates = [schedule for schedule in family if costs.ratio(schedule) <= target * (1 + TOLERANCE)]
    scored = [(_score(model, images, reference, schedule)[0], schedule)
              for schedule in progress_bar(candidates, desc="tome schedules", show=progress, leave=False)]
    reconfigure(model, remaining=_on_budget(model, min(scored)[1], target, images[:1], costs))
    return len(candidates), default


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
