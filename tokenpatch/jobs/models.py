"""The model a command works on: built by name with its published weights (or those of
``--checkpoint``, or random ones when asked for), how its images are prepared, and the patch the
user asked for or, when nothing overrides it, the one a ``tokenpatch.save`` checkpoint brings."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import nn

from ..api import get_method_name, patch, set_macs_ratio, set_options, unpatch
from ..backends.build import Preprocessing, build_model
from ..checkpoint import is_checkpoint, load, load_official_state, load_state, official_method, read_state_dict
from ..core.registry import DEFAULT_METHOD
from ..errors import InvalidOptionError

#: the keep ratio of a patch that names none (and comes from no tokenpatch checkpoint)
DEFAULT_KEEP_RATIO = 0.5
#: the share of the unpatched MACs a table comparing methods gives each one when no budget is named:
#: one keep ratio means different MACs to different methods (``pitome``'s is per block)
DEFAULT_MACS_RATIO = 0.65


@dataclass(frozen=True)
class PatchRequest:
    """The patch a command was asked for. ``None`` (and no options) where the user gave nothing,
    so that a tokenpatch checkpoint's own method and options apply; without one, the default
    method (``tome``) at :data:`DEFAULT_KEEP_RATIO`. ``macs_ratio`` replaces the keep ratio by a fitted one."""

    method: Optional[str] = None
    keep_ratio: Optional[float] = None
    macs_ratio: Optional[float] = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        keep_ratio, options = lift_keep_ratio(self.keep_ratio, self.macs_ratio, self.options)
        object.__setattr__(self, "keep_ratio", keep_ratio)
        object.__setattr__(self, "options", options)


def lift_keep_ratio(keep_ratio: Optional[float], macs_ratio: Optional[float],
                    options: dict[str, Any]) -> tuple[Optional[float], dict[str, Any]]:
    """The keep ratio and the other options of a request whose options may hold ``keep_ratio``
    too (``--option keep_ratio=...``, ``--methods M:keep_ratio=...``).

    Raises:
        InvalidOptionError: the keep ratio is given twice with different values, or beside a MACs share.
    """
    if "keep_ratio" not in options:
        return keep_ratio, options
    given = options["keep_ratio"]
    if keep_ratio is not None and keep_ratio != given:
        raise InvalidOptionError(f"keep_ratio given twice ({keep_ratio} and keep_ratio={given}); give it once")
    if macs_ratio is not None:
        raise InvalidOptionError(f"keep_ratio={given} and a macs ratio ({macs_ratio}) both set the budget; give one")
    return given, {k: v for k, v in options.items() if k != "keep_ratio"}


@dataclass
class LoadedModel:
    """A model spec's unpatched model with its weights, the patched model a tokenpatch checkpoint
    holds (``None`` for plain weights or none), how its images are prepared, and where its weights
    came from (``"pretrained"``, ``"random weights"`` or ``"checkpoint FILE"``)."""

    unpatched: nn.Module
    preprocessing: Preprocessing
    weights: str
    saved: Optional[nn.Module] = None

    def patched(self, request: PatchRequest) -> nn.Module:
        """The patched model ``request`` asks for: the saved one, changed by the request's keep
        ratio, options or MACs share, unless the request names another method; otherwise a copy of
        the unpatched model patched as requested (a checkpoint's method modules are then unused)."""
        if self.saved is not None and request.method in (None, get_method_name(self.saved)):
            changes = {**request.options, **({} if request.keep_ratio is None else {"keep_ratio": request.keep_ratio})}
            if changes:
                set_options(self.saved, **changes)
            if request.macs_ratio is not None:
                set_macs_ratio(self.saved, request.macs_ratio)
            return self.saved
        keep_ratio = None if request.macs_ratio is not None else (
            DEFAULT_KEEP_RATIO if request.keep_ratio is None else request.keep_ratio)
        return patch(copy.deepcopy(self.unpatched), request.method or DEFAULT_METHOD, keep_ratio=keep_ratio,
                     macs_ratio=request.macs_ratio, **request.options)


def load_model(spec: str, checkpoint: Optional[str] = None, img_size: Optional[int] = None,
               pretrained: bool = True, drop_path: Optional[float] = None) -> LoadedModel:
    """Build ``spec`` (a timm name, ``hf-hub:ORG/NAME``, or ``hf:ORG/NAME``/``hf:PATH`` for
    transformers; see :func:`~tokenpatch.backends.build.build_model`) with its published weights
    (random ones when not ``pretrained``), or with ``checkpoint``'s: plain weights (a safetensors or
    torch state dict; the papers' training scripts' files too) or a ``tokenpatch.save`` file (then
    also kept patched, as is an official checkpoint with a method's own modules, at that method's
    default options: :func:`~tokenpatch.checkpoint.load_official`). ``drop_path``: the
    stochastic depth rate to train with (see :func:`~tokenpatch.backends.build.build_model`).

    Raises:
        TokenPatchError: the model or its weights cannot be had (one line saying why).
        CheckpointError: the file cannot be read or does not fit the model (one line naming it).
    """
    built = build_model(spec, img_size, pretrained=pretrained and checkpoint is None, drop_path=drop_path)
    model, preprocessing = built.model, built.preprocessing
    if checkpoint is None:
        return LoadedModel(model, preprocessing, "pretrained" if built.pretrained else "random weights")
    weights = f"checkpoint {checkpoint}"
    if is_checkpoint(checkpoint):
        saved = load(model, checkpoint)
    else:  # plain weights, or a method's official checkpoint with its own modules (DynamicViT's predictors)
        state = read_state_dict(checkpoint)
        method = official_method(state)
        if method is None:
            load_state(model, state, checkpoint)
            return LoadedModel(model, preprocessing, weights)
        saved = load_official_state(model, state, checkpoint, method)
    return LoadedModel(unpatch(copy.deepcopy(saved)), preprocessing, weights, saved)
