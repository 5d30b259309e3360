"""Installing and removing the patched forwards.

A patched model keeps its class, modules, parameters and buffers. Only instance attributes
are added: each block's ``forward`` becomes a bound method routing through the method, the
model's ``forward`` gains input checks, and ``_tokenpatch`` holds the shared
:class:`PatchContext`. Deleting them restores the class forwards exactly. A method with
trainable parts (e.g. DynamicViT's predictors) adds them as one submodule named ``tokenpatch``,
so they appear in ``state_dict`` under the ``tokenpatch.`` prefix; ``unpatch`` removes it. Bound methods (not
closures) keep ``copy.deepcopy`` of a patched model correct.
"""

from __future__ import annotations

import copy
import types
from typing import Any, Optional

from torch import Tensor, nn

from .backends.base import Backend
from .engine import PassState
from .errors import InputShapeError, NotPatchedError, TokenPatchError
from .methods.base import Method, MethodConfig
from .trace import Trace

CONTEXT_ATTR = "_tokenpatch"
INDEX_ATTR = "_tokenpatch_index"
MODULES_NAME = "tokenpatch"


class PatchContext:
    """State shared by a patched model and its blocks: method, options and the current pass.

    Attributes:
        modules: the method's trainable modules (registered on the model), or None.
        collect: training signals the losses asked the method to produce (e.g. ``"attention"``).
        aux: what the last training-mode pass left for the losses (see :mod:`tokenpatch.losses`).
    """

    def __init__(self, backend: Backend, method: Method, config: MethodConfig, num_prefix: int, depth: int,
                 pools_class_token: bool = True) -> None:
        self.backend = backend
        self.pools_class_token = pools_class_token
        self.method = method
        self.num_prefix = num_prefix
        self.depth = depth
        self.modules: Optional[nn.Module] = None  # set by patch() once the options are validated
        self.state: Optional[PassState] = None
        self.trace: Optional[Trace] = None
        self.collect: frozenset[str] = frozenset()
        self.aux: dict[str, list] = {}
        self.set_config(config)

    def __deepcopy__(self, memo: dict[int, Any]) -> "PatchContext":
        # A copy starts with no pass in flight: the last pass's tensors are graph nodes, which
        # deepcopy refuses, and belong to the original's computation anyway.
        clone = copy.copy(self)
        memo[id(self)] = clone
        for name, value in self.__dict__.items():
            if name not in ("state", "aux"):
                setattr(clone, name, copy.deepcopy(value, memo))
        clone.state, clone.aux = None, {}
        return clone

    def set_config(self, config: MethodConfig) -> None:
        """Validate and adopt ``config``; recompute the per-block schedule."""
        config.validate(self.depth)
        self.method.check_compatible(config, self.pools_class_token)
        self.config = config
        self.plan = self.method.schedule(config, self.depth)

    def run_block(self, block: nn.Module, index: int, x: Tensor) -> Tensor:
        """Forward of block ``index`` on (B, N, C) tokens under the method's schedule."""
        if index == 0 or self.state is None:  # every pass enters through block 0
            self.state = PassState.start(x, self.num_prefix, self.depth, self.trace, self.modules, self.collect)
        ratio = self.plan[index]
        if ratio is None or ratio >= 1.0:
            out = self.backend.run_original(block, x)
            self.state.record(index, x.shape[1], out.shape[1])
            return out
        view = self.backend.view(block)
        return self.method.reduce_block(view, x, self.state, index, ratio, self.config)


def context_of(model: nn.Module) -> PatchContext:
    """The model's :class:`PatchContext`, or :class:`NotPatchedError`."""
    ctx = model.__dict__.get(CONTEXT_ATTR) if isinstance(model, nn.Module) else None
    if ctx is None:
        raise NotPatchedError(f"{type(model).__name__} is not patched; call tokenpatch.patch(model, ...) first")
    return ctx


def is_patched(model: nn.Module) -> bool:
    """True if ``model`` carries a tokenpatch patch."""
    return isinstance(model, nn.Module) and CONTEXT_ATTR in model.__dict__


def _block_forward(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    ctx: PatchContext = block.__dict__[CONTEXT_ATTR]
    x = ctx.backend.block_input(args, dict(kwargs))
    return ctx.backend.block_output(ctx.run_block(block, block.__dict__[INDEX_ATTR], x))


def check_images(images: Any) -> None:
    """Raise :class:`InputShapeError` unless ``images`` is a (B, C, H, W) tensor."""
    if not isinstance(images, Tensor):
        raise InputShapeError(f"expected an image tensor of shape (B, C, H, W), got {type(images).__name__}")
    if images.ndim != 4:
        raise InputShapeError(f"expected images of shape (B, C, H, W), got a {images.ndim}-D tensor of shape {tuple(images.shape)}")


def _model_forward(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    ctx: PatchContext = model.__dict__[CONTEXT_ATTR]
    check_images(ctx.backend.image_input(args, kwargs))
    checkpointing = getattr(model, "grad_checkpointing", False) or getattr(model, "is_activation_checkpointing", False)
    if model.training and checkpointing:
        raise TokenPatchError(
            "gradient checkpointing re-runs blocks during backward, which a patched model's "
            "per-pass token state does not allow; turn it off (timm: model.set_grad_checkpointing(False); transformers: model.gradient_checkpointing_disable())"
        )
    ctx.aux = {}
    try:
        return type(model).forward(model, *args, **kwargs)
    finally:
        if model.training and ctx.state is not None:
            ctx.aux = ctx.state.aux
        ctx.state = None  # release this pass's tensors


def install(model: nn.Module, ctx: PatchContext) -> None:
    """Attach ``ctx`` and the patched forwards to ``model`` and its blocks (all or nothing)."""
    try:
        for index, block in enumerate(ctx.backend.blocks(model)):
            block.__dict__[CONTEXT_ATTR] = ctx
            block.__dict__[INDEX_ATTR] = index
            block.forward = types.MethodType(_block_forward, block)
        if ctx.modules is not None:
            if MODULES_NAME in model._modules:
                raise TokenPatchError(f"{type(model).__name__} already has a submodule named {MODULES_NAME!r}")
            model.add_module(MODULES_NAME, ctx.modules)
        model.__dict__[CONTEXT_ATTR] = ctx
        model.forward = types.MethodType(_model_forward, model)
    except Exception:
        uninstall(model, ctx.backend, ctx.modules)
        raise


def uninstall(model: nn.Module, backend: Backend, modules: Optional[nn.Module]) -> None:
    """Remove everything :func:`install` added (attributes, the method's modules); safe on a partly patched model."""
    for module in [*backend.blocks(model), model]:
        for name in ("forward", CONTEXT_ATTR, INDEX_ATTR):
            module.__dict__.pop(name, None)
    if modules is not None and model._modules.get(MODULES_NAME) is modules:
        del model._modules[MODULES_NAME]
