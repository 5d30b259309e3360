"""Saving a patched model and re-creating it: weights plus the method and its options.

A tokenpatch checkpoint is a safetensors file of the model's ``state_dict`` (the unpatched
keys) whose metadata holds the method name and its options as JSON, so that
``load(fresh_model, path)`` returns the same patched model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, TypeVar, Union

from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from .api import patch, unpatch
from .core.registry import get_method
from .core.runner import context_of, is_patched
from .errors import TokenPatchError

METADATA_KEY = "tokenpatch"
ModelT = TypeVar("ModelT", bound=nn.Module)
PathLike = Union[str, os.PathLike]


def config_dict(model: nn.Module) -> dict[str, Any]:
    """``{"method": name, "options": {...}}`` of a patched model (JSON-ready)."""
    ctx = context_of(model)
    return {"method": ctx.method.name, "options": ctx.settings.config.to_dict()}


def save_config(model: nn.Module, path: PathLike) -> None:
    """Write the patched model's method and options as JSON."""
    with open(path, "w") as f:
        json.dump(config_dict(model), f, indent=2)


def load_config(path: PathLike) -> dict[str, Any]:
    """Read a file written by :func:`save_config`."""
    with open(path) as f:
        return json.load(f)


def patch_from_config(model: ModelT, config: dict[str, Any]) -> ModelT:
    """Patch an unpatched ``model`` with a ``{"method", "options"}`` dict."""
    method = get_method(config["method"])
    fields = {f.name for f in dataclasses.fields(method.config_class)}
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in config["options"].items() if k in fields}
    return patch(model, method.name, **options)


def save(model: nn.Module, path: PathLike) -> None:
    """Save a patched model's weights and tokenpatch configuration to one safetensors file."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={METADATA_KEY: json.dumps(config_dict(model))})


def is_checkpoint(path: PathLike) -> bool:
    """True when ``path`` is a safetensors file written by :func:`save` (with tokenpatch metadata)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return METADATA_KEY in (f.metadata() or {})
    except Exception:  # not safetensors at all (a torch state dict, a missing file): not ours
        return False


def load(model: ModelT, path: PathLike) -> ModelT:
    """Load a :func:`save` file into an unpatched ``model`` of the same architecture and patch it.

    The model is patched first, so that modules the method adds (e.g. DynamicViT's
    predictors, saved under ``tokenpatch.``) exist and receive their saved weights.

    Returns:
        ``model``, with the saved weights, patched with the saved method and options.

    Raises:
        TokenPatchError: if the model is already patched, the file has no tokenpatch metadata, or
            its tensors do not match the model's (the model is then left unpatched and unchanged).
    """
    if is_patched(model):
        raise TokenPatchError("load() expects an unpatched model; call tokenpatch.unpatch(model) first")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if METADATA_KEY not in metadata:
        raise TokenPatchError(f"{path} is not a tokenpatch checkpoint (no {METADATA_KEY!r} metadata)")
    state = load_file(str(path))
    patch_from_config(model, json.loads(metadata[METADATA_KEY]))
    try:
        _check_keys(model, state, path)
        model.load_state_dict(state, strict=True)
    except Exception:
        unpatch(model)
        raise
    return model


def _check_keys(model: nn.Module, state: dict[str, Any], path: PathLike) -> None:
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise TokenPatchError(
            f"{path} does not fit this {type(model).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatch {wrong[:5]} (first 5 of each)"
        )
