"""The ``tokenpatch eval`` job: MACs, accuracy and agreement of several methods on an image folder.

Every method (with its own options) is patched onto a copy of the same model, optionally fitted
to a share of the unpatched MACs on the first images, and run on every image; the unpatched
model runs in the same process, so the agreement column needs no labels.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from torch import Tensor, nn

from ..api import get_config, patch, set_macs_ratio
from ..core.options import parse_options
from ..core.registry import get_method
from ..errors import InvalidOptionError
from ..measure.budget import mean_macs_per_image
from ..measure.evaluate import accuracy, predict

EVAL_COLUMNS = ["method", "keep_ratio", "gmacs", "macs_ratio", "top1", "top5", "agreement"]


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


@dataclass(frozen=True)
class EvalData:
    """Images to evaluate on: (M, 3, H, W) ``images`` and (M,) ``labels`` (-1 where unknown)."""

    images: Tensor
    labels: Tensor

    @property
    def labelled(self) -> bool:
        return bool((self.labels >= 0).all())


def evaluation_rows(model: nn.Module, data: EvalData, methods: Sequence[MethodSpec], keep_ratio: Optional[float] = None,
                    macs_ratio: Optional[float] = None, calibration: int = 16, mac_images: int = 8,
                    batch_size: int = 50, progress: bool = True) -> list[dict[str, Any]]:
    """One row for the unpatched ``model``, then one per method.

    Args:
        keep_ratio: every method's keep ratio (None: each method's default; a spec's own ``model``
            keeps its ratio), or
        macs_ratio: the share of the unpatched MACs each method is fitted to, counted on the
            first ``calibration`` images (per-image counts vary for some methods).
        mac_images: MACs are the mean over this many images, counted one by one.

    Returns:
        Rows with ``method``, ``keep_ratio``, ``gmacs``, ``macs_ratio``, ``top1``/``top5`` (None
        without labels) and ``agreement`` with the unpatched top-1 (percent); a method that cannot
        reach ``macs_ratio`` gets a row with only a ``note`` saying how near it came.
    """
    if keep_ratio is not None and macs_ratio is not None:
        raise InvalidOptionError("give keep_ratio or macs_ratio, not both")
    reference = predict(model, data.images, batch_size, progress, desc="unpatched")
    base_macs = mean_macs_per_image(model, data.images[:1])
    rows = [_row("unpatched", None, base_macs, base_macs, reference, reference, data)]
    for spec in methods:
        label = spec.label or spec.name
        patched = spec.model
        if patched is None:
            patched = patch(copy.deepcopy(model), spec.name, keep_ratio=keep_ratio, **spec.options)
        if macs_ratio is not None:
            try:
                set_macs_ratio(patched, macs_ratio, data.images[:calibration])
            except InvalidOptionError as exc:  # e.g. ats: its sampler drops more than the budget allows
                rows.append({"method": label, "note": str(exc)})
                continue
        logits = predict(patched, data.images, batch_size, progress, desc=label)
        fixed = get_method(spec.name).fixed_token_counts(get_config(patched))
        macs = mean_macs_per_image(patched, data.images[: 1 if fixed else mac_images])
        rows.append(_row(label, get_config(patched).keep_ratio, macs, base_macs, logits, reference, data))
    return rows


def _row(method: str, keep_ratio: Optional[float], macs: float, base_macs: float, logits: Tensor, reference: Tensor,
         data: EvalData) -> dict[str, Any]:
    scores = accuracy(logits, data.labels.clamp_min(0), reference)
    return {"method": method, "keep_ratio": keep_ratio, "gmacs": macs / 1e9, "macs_ratio": macs / base_macs,
            "top1": scores.top1 if data.labelled else None, "top5": scores.top5 if data.labelled else None,
            "agreement": scores.agreement}
