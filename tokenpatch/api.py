"""Public API: ``patch``, ``unpatch``, ``set_keep_ratio``, ``set_options``, the method registry."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, TypeVar

import torch
from torch import nn

from . import methods as _builtin_methods  # noqa: F401  (registers the built-in methods)
from .backends import find_backend
from .core.method import MethodConfig
from .core.registry import DEFAULT_METHOD, METHODS, get_method
from .core.runner import (MODULES_NAME, PatchContext, build_config, context_of, install, is_patched, reconfigure,
                          remove_patch, uninstall)
from .errors import AlreadyPatchedError, InvalidOptionError
from .measure.budget import set_macs_ratio

ModelT = TypeVar("ModelT", bound=nn.Module)


def available_methods() -> dict[str, str]:
    """Registered method names, each with a one-line summary."""
    return {name: method.summary for name, method in sorted(METHODS.items())}


def patch(model: ModelT, method: str = DEFAULT_METHOD, keep_ratio: Optional[float] = None, *,
          macs_ratio: Optional[float] = None, macs_input: Optional[Any] = None, outputs: str = "full",
          **options: Any) -> ModelT:
    """Make ``model`` compute on fewer tokens, in place.

    The model keeps its class, parameters and ``state_dict``; only its forward changes.
    On any error the model is left exactly as it was.

    Args:
        model: a supported ViT (see docs/models.md for the list), e.g. from ``timm.create_model``.
        method: one of :func:`available_methods` (``"tome"`` by default: ToMe's official rule,
            which ranks tokens by similarity rather than by one model's attention statistics).
        keep_ratio: fraction of patch tokens kept, in (0, 1]; None takes the method's default.
            1.0 reproduces the unpatched outputs.
        macs_ratio: instead of ``keep_ratio``, the share of the unpatched MACs to spend, in
            (0, 1]: the keep ratio is solved so that counted MACs are within 1 % of it (see
            :func:`tokenpatch.set_macs_ratio`).
        macs_input: (B, 3, H, W) images (or a shape) the MACs are counted on for ``macs_ratio``;
            matters for methods whose token counts follow the image (ats, sait with mass, iared2).
        outputs: what callers that read tokens get (``forward_features``, timm's
            ``forward_intermediates``, transformers' ``last_hidden_state``/``hidden_states``):
            ``"full"`` (default) every original token in its order, dropped tokens as they left
            and merged ones copied to each patch they stand for; ``"reduced"`` the method's
            tokens, whose original positions :func:`output_positions` gives. The classifier
            output is the method's own either way.
        **options: method options, e.g. ``schedule="geometric"`` for ``idle`` or ``fuse=True``
            for ``evit``; unknown names and values of the wrong type are an error.

    Returns:
        ``model`` itself.

    Raises:
        UnknownMethodError: ``method`` is not registered.
        InvalidOptionError: an option is unknown, mistyped or out of range, or both ratios are given.
        UnsupportedModelError: no backend patches this model.
        AlreadyPatchedError: the model is patched already.
    """
    if keep_ratio is not None and macs_ratio is not None:
        raise InvalidOptionError("give keep_ratio or macs_ratio, not both")
    ctx = _checked_context(model, method, keep_ratio, options, outputs)
    ctx.modules = _build_modules(model, ctx)
    if ctx.modules is not None:
        reference = next(model.parameters())
        ctx.modules.to(device=reference.device, dtype=reference.dtype).train(model.training)
    install(model, ctx)
    if macs_ratio is not None:
        try:
            set_macs_ratio(model, macs_ratio, macs_input)
        except BaseException:
            uninstall(model, ctx.backend, ctx.modules)
            raise
    return model


def module_shapes(model: nn.Module, method: str = DEFAULT_METHOD, keep_ratio: Optional[float] = None,
                  **options: Any) -> dict[str, torch.Size]:
    """Shapes of the weights ``patch(model, method, keep_ratio, **options)`` would add to the
    unpatched ``model``'s ``state_dict`` (keys under ``tokenpatch.``; empty for a method without
    modules), found without allocating them: the modules are built on the meta device.

    Raises:
        the errors of :func:`patch` for these arguments.
    """
    ctx = _checked_context(model, method, keep_ratio, options, "full")
    with torch.device("meta"):
        modules = _build_modules(model, ctx)
    state = {} if modules is None else modules.state_dict()
    return {f"{MODULES_NAME}.{key}": tensor.shape for key, tensor in state.items()}


def _checked_context(model: nn.Module, method: str, keep_ratio: Optional[float], options: dict[str, Any],
                     outputs: str) -> PatchContext:
    """The context ``patch`` would install, every argument checked against the unpatched ``model``."""
    chosen = get_method(method)
    if is_patched(model):
        raise AlreadyPatchedError(
            f"{type(model).__name__} is already patched with {context_of(model).method.name!r}; "
            "call tokenpatch.unpatch(model) first, or tokenpatch.set_keep_ratio(model, r) to change sparsity"
        )
    backend = find_backend(model)
    config = build_config(chosen, keep_ratio, options)
    backend.check_outputs(model, outputs)
    return PatchContext(backend, chosen, config, backend.facts(model), outputs=outputs)  # validates the options


def _build_modules(model: nn.Module, ctx: PatchContext) -> Optional[nn.Module]:
    return ctx.method.build_modules(ctx.config, ctx.facts.depth, ctx.backend.embed_dim(model))


def unpatch(model: ModelT) -> ModelT:
    """Restore the original forward of a patched ``model``, in place, and return it.

    Raises:
        NotPatchedError: if the model is not patched.
    """
    remove_patch(model)
    return model


def set_keep_ratio(model: nn.Module, keep_ratio: float) -> None:
    """Change a patched model's keep ratio on the fly (no re-patching, no weight change).

    Atomic: passes already running finish with the old ratio; passes that start after the call
    use the new one, in every thread.

    Raises:
        NotPatchedError: the model is not patched.
        InvalidOptionError: ``keep_ratio`` is outside (0, 1].
    """
    set_options(model, keep_ratio=keep_ratio)  # the config's validation checks the range


def set_options(model: nn.Module, **options: Any) -> None:
    """Change a patched model's method options on the fly, e.g. ``set_options(model, mass=0.8)`` for ``sait``.

    Atomic, like :func:`set_keep_ratio`. Options the method built modules from (``prune_blocks``
    of ``dynamicvit``) are fixed at patch time. On error the options are left as they were.

    Raises:
        NotPatchedError: the model is not patched.
        InvalidOptionError: an unknown, fixed, mistyped or out-of-range option.
    """
    reconfigure(model, **options)


def get_config(model: nn.Module) -> MethodConfig:
    """A copy of the patched model's method options."""
    return dataclasses.replace(context_of(model).settings.config)


def get_method_name(model: nn.Module) -> str:
    """Name of the method a patched model uses."""
    return context_of(model).method.name
