"""Patch to a MAC budget: find the keep ratio whose counted MACs hit a share of the unpatched MACs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from torch import Tensor, nn

from ..backends import find_backend
from ..core.runner import context_of, overriding, reconfigure
from ..errors import InvalidOptionError, UnreachableBudgetError
from .flops import as_input, count_macs

#: relative distance to the target MAC share that counts as a hit
TOLERANCE = 0.01
#: smallest keep ratio tried
LOWEST_KEEP_RATIO = 1e-3
#: largest keep ratio below 1 tried (1.0 is dense for every method: it says nothing about a budget)
HIGHEST_KEEP_RATIO = 1 - 1e-3


@dataclass(frozen=True)
class BudgetFit:
    """The keep ratio chosen for a MAC budget.

    Attributes:
        keep_ratio: the keep ratio now set on the model.
        macs_ratio: its counted MACs over the unpatched MACs (mean per image of the input).
        target: the MAC share asked for.
    """

    keep_ratio: float
    macs_ratio: float
    target: float


def check_macs_ratio(macs_ratio: Any) -> float:
    """``macs_ratio`` as a float in (0, 1], or a clear error."""
    if isinstance(macs_ratio, bool) or not isinstance(macs_ratio, (int, float)) or not 0 < macs_ratio <= 1:
        raise InvalidOptionError(f"macs_ratio must be a number in (0, 1] (share of the unpatched MACs), got {macs_ratio!r}")
    return float(macs_ratio)


def mean_macs_per_image(model: nn.Module, images: Tensor) -> float:
    """MACs per image of (B, 3, H, W) ``images``, counted image by image (a padded batch would count its padding)."""
    return sum(count_macs(model, images[i : i + 1]).total for i in range(len(images))) / len(images)


def set_macs_ratio(model: nn.Module, macs_ratio: float, macs_input: Optional[Union[Tensor, tuple[int, ...]]] = None,
                   tolerance: float = TOLERANCE) -> BudgetFit:
    """Set a patched model's keep ratio so that its MACs are ``macs_ratio`` of the unpatched MACs.

    Bisection on the keep ratio, counting MACs with :func:`~tokenpatch.measure.flops.count_macs`
    (the unpatched count is the same model at keep ratio 1.0, which every method makes dense);
    the method maps each keep ratio to its options (``Method.budget_options``). The trials run
    in this thread only; other threads keep using the model's options until the fitted ratio is
    set, atomically, at the end. Methods
    whose token counts depend on the image (``ats``, ``sait`` with ``mass``, ``iared2`` with a
    threshold) are fitted on ``macs_input``: pass real images for a budget that holds on real data.

    Args:
        model: a patched model.
        macs_ratio: target share of the unpatched MACs, in (0, 1].
        macs_input: (B, 3, H, W) images to count on, or an input shape; None: one random image
            of the model's input size.
        tolerance: accepted relative distance to the target (1 % by default).

    Returns:
        The :class:`BudgetFit`; the model keeps its fitted keep ratio.

    Raises:
        InvalidOptionError: ``macs_ratio`` out of range, options the method can't fit to a budget
            (``tome`` with ``r`` set), or no keep ratio within ``tolerance`` (the message names the
            nearest share reachable); the model's options are then left as they were.
    """
    target = check_macs_ratio(macs_ratio)
    ctx = context_of(model)
    config = ctx.settings.config

    def knobs(keep: float) -> dict[str, Any]:
        return ctx.method.budget_options(config, keep)

    knobs(1.0)  # the method refuses options it can't fit before anything is counted
    shape = (1, 3, *find_backend(model).input_size(model))
    images = as_input(model, macs_input if macs_input is not None else shape)
    if ctx.method.fixed_token_counts(config):
        images = images[:1]  # every image costs the same: one is enough, and fvcore's tracing is slow

    def macs_at(keep: float) -> float:
        with overriding(model, **knobs(keep)):
            return mean_macs_per_image(model, images)

    base = macs_at(1.0)
    tried = _bisect(lambda keep: macs_at(keep) / base, target, tolerance)
    keep = min(tried, key=lambda k: abs(tried[k] - target))
    if abs(tried[keep] - target) > tolerance * target:
        raise UnreachableBudgetError(
            f"{ctx.method.name} can't reach macs_ratio={target} within {tolerance:.0%}: the nearest share of "
            f"the unpatched MACs is {tried[keep]:.3f} (keep_ratio={keep:.4f})"
        )
    reconfigure(model, **knobs(keep))
    return BudgetFit(keep_ratio=keep, macs_ratio=tried[keep], target=target)


def _bisect(share: Callable[[float], float], target: float, tolerance: float) -> dict[float, float]:
    """Keep ratios tried by bisection on the non-decreasing ``share(keep)``, with their shares."""
    low, high = LOWEST_KEEP_RATIO, 1.0
    tried = {low: share(low)}
    if tried[low] > target * (1 + tolerance):
        return tried  # even the smallest keep ratio spends too much
    tried[HIGHEST_KEEP_RATIO] = share(HIGHEST_KEEP_RATIO)
    if tried[HIGHEST_KEEP_RATIO] < target * (1 - tolerance):
        return tried  # even the largest spends too little (ats: its sampler drops tokens at any keep ratio)
    for _ in range(40):
        middle = (low + high) / 2
        tried[middle] = share(middle)
        if abs(tried[middle] - target) <= tolerance * target or high - low < 1e-5:
            break
        low, high = (middle, high) if tried[middle] < target else (low, middle)
    return tried
