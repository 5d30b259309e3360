"""Saving a patched model and re-creating it: weights plus the method and its options.

A tokenpatch checkpoint is a safetensors file of the model's ``state_dict`` (the unpatched
keys) whose metadata holds the method name and its options as JSON and a SHA-256 digest of the
tensors, so that ``load(fresh_model, path)`` returns the same patched model or refuses a
damaged file. Files are written under a temporary name and renamed, with the user's umask.
Plain state dicts (``.safetensors`` or torch files) are read by :func:`load_weights`.

Every problem with a file raises a :class:`~tokenpatch.errors.CheckpointError` whose one-line
message names the path, and leaves the model as it was.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, TypeVar, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file
from torch import Tensor, nn

from .api import module_shapes, patch, unpatch
from .core.options import first_repeated
from .core.registry import METHODS, get_method
from .core.runner import MODULES_NAME, context_of, is_patched
from .errors import (AlreadyPatchedError, CheckpointError, CheckpointMismatchError, CorruptCheckpointError,
                     InvalidOptionError, UnknownMethodError, first_line)
from .files import write_atomically, write_text_atomically

METADATA_KEY = "tokenpatch"
#: metadata key of the tensors' SHA-256 (:func:`tensor_digest`); files saved before it existed have none
DIGEST_KEY = "tokenpatch_sha256"
ModelT = TypeVar("ModelT", bound=nn.Module)
PathLike = Union[str, os.PathLike]


def config_dict(model: nn.Module) -> dict[str, Any]:
    """``{"method": name, "options": {...}}`` of a patched model (JSON-ready)."""
    return context_of(model).config_dict()


def save_config(model: nn.Module, path: PathLike) -> None:
    """Write the patched model's method and options as JSON (atomically)."""
    write_text_atomically(path, json.dumps(config_dict(model), indent=2))


def load_config(path: PathLike) -> dict[str, Any]:
    """Read a file written by :func:`save_config` (a :class:`CheckpointError` if it is not one)."""
    _check_file(path)
    try:
        return _config_from_text(path, Path(path).read_text())
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path} is not a tokenpatch config: not text") from exc


def saved_options(config: dict[str, Any]) -> dict[str, Any]:
    """The options to patch with for a ``{"method", "options"}`` dict (lists become tuples).

    An option of the method's official rule that the dict lacks (it was written before the option
    existed) takes the official value, the rule the file was saved with, and says so in one warning.
    """
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in config["options"].items()}
    method = METHODS.get(config["method"])
    older = {k: v for k, v in (method.official_options if method else {}).items() if k not in options}
    if older:
        settings = ", ".join(f"{k}={v!r}" for k, v in older.items())
        warnings.warn(f"{config['method']} file saved before {', '.join(older)} existed: it loads with the rule it was "
                      f"saved with, {settings}, not today's default", UserWarning, stacklevel=3)
    return {**options, **older}


def tensor_digest(state: Mapping[str, Tensor]) -> str:
    """SHA-256 (hex) of every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def save(model: nn.Module, path: PathLike) -> None:
    """Save a patched model's weights, tokenpatch configuration and their digest to one safetensors file.

    The file is written under a temporary name in the same folder and renamed, so a reader never
    sees a half-written checkpoint; it gets the permissions of any new file (0666 less the umask).
    """
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    metadata = {METADATA_KEY: json.dumps(config_dict(model)), DIGEST_KEY: tensor_digest(state)}
    write_atomically(path, lambda name: save_file(state, name, metadata=metadata))


def is_checkpoint(path: PathLike) -> bool:
    """True when ``path`` is a safetensors file written by :func:`save` (with tokenpatch metadata)."""
    return _saved_metadata(path) is not None


def saved_config(path: PathLike) -> Optional[dict[str, Any]]:
    """The ``{"method", "options"}`` a :func:`save` file holds (read from its header only), or None
    for any other file (plain weights, a missing file).

    Raises:
        CheckpointError: the file has tokenpatch metadata that is not a valid configuration.
    """
    metadata = _saved_metadata(path)
    return None if metadata is None else _config_from_text(path, metadata)


def _saved_metadata(path: PathLike) -> Optional[str]:
    """The tokenpatch metadata of a safetensors file, or None (no such metadata, not safetensors,
    or not a regular file: opening a FIFO or a device would block or read forever)."""
    if not Path(path).is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get(METADATA_KEY)
    except Exception:  # not safetensors at all (a torch state dict, a missing file): not ours
        return None


def load(model: ModelT, path: PathLike) -> ModelT:
    """Load a :func:`save` file into an unpatched ``model`` of the same architecture and patch it.

    The file is read and its digest checked before the model is touched; then the model is
    patched, so that modules the method adds (e.g. DynamicViT's predictors, saved under
    ``tokenpatch.``) exist and receive their saved weights.

    Returns:
        ``model``, with the saved weights, patched with the saved method and options.

    Raises:
        AlreadyPatchedError: if the model is already patched.
        CheckpointError: the file is missing, empty, truncated, not safetensors or has no (or
            unreadable) tokenpatch metadata; :class:`CorruptCheckpointError` when its tensors do not
            match their digest; :class:`CheckpointMismatchError` when its method or options cannot
            be built or its tensors do not fit the model. The model is then left unpatched and unchanged.
    """
    if is_patched(model):
        raise AlreadyPatchedError(f"load() expects an unpatched model, not one patched already; call "
                                  f"tokenpatch.unpatch(model) before loading {path}")
    state, metadata = _read_safetensors(path)
    if METADATA_KEY not in metadata:
        raise CheckpointError(f"{path} is not a tokenpatch checkpoint (no {METADATA_KEY!r} metadata); "
                              "plain weights load with tokenpatch.checkpoint.load_weights")
    config = _config_from_text(path, metadata[METADATA_KEY])
    if DIGEST_KEY in metadata and tensor_digest(state) != metadata[DIGEST_KEY]:
        raise CorruptCheckpointError(f"{path} is corrupted: its tensors do not match the digest saved with them")
    patch_as_saved(model, config, state, path)
    try:
        load_state(model, state, path)
    except BaseException:
        unpatch(model)
        raise
    return model


def patch_as_saved(model: nn.Module, config: dict[str, Any], state: Mapping[str, Tensor], path: PathLike) -> None:
    """Patch the unpatched ``model`` with the method and options of a saved ``config``
    (:func:`saved_options`), once the method weights among ``state`` (``tokenpatch.*``) are checked
    to be the ones those options build; a :class:`CheckpointMismatchError` naming ``path`` otherwise."""
    options = saved_options(config)
    try:
        check_module_shapes(model, module_shapes(model, config["method"], **options), state, path)
        patch(model, config["method"], **options)
    except (UnknownMethodError, InvalidOptionError) as exc:
        raise CheckpointMismatchError(f"{path} cannot be patched in: {exc}") from exc


def read_state_dict(path: PathLike) -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` file or of a torch state dict (also one under a ``model``
    or ``state_dict`` key, beside the optimizer and the ``argparse`` arguments the papers' training
    scripts save with it), read without unpickling code.

    Raises:
        CheckpointError: naming ``path`` and why it is not a state dict.
    """
    if Path(path).suffix == ".safetensors":
        return _read_safetensors(path)[0]
    _check_file(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # a plain record of the training arguments
            content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors: the file is not a torch save of tensors
        reason = first_line(exc).split(". ")[0]  # torch's refusal explains weights_only at length
        raise CheckpointError(f"{path} is not a torch state dict or safetensors file ({reason})") from exc
    if isinstance(content, Mapping):
        content = content.get("model", content.get("state_dict", content))
    if not isinstance(content, Mapping) or not all(isinstance(v, Tensor) for v in content.values()):
        raise CheckpointError(f"{path} holds a {type(content).__name__} that is not a state dict (names to tensors)")
    return dict(content)


def load_official(model: ModelT, path: PathLike, method: Optional[str] = None, **options: Any) -> ModelT:
    """Load a checkpoint saved by a method's official training code into the unpatched ``model``
    and return it patched with ``method`` and ``options`` on the method's official rule
    (:attr:`~tokenpatch.core.method.Method.official_options`, e.g. ``idle_update="unchanged"``,
    unless ``options`` say otherwise). ``options`` are the user's: the official files do not
    record them; the IdleViT and DynamicViT releases name the keep ratio in the file name, e.g.
    ``idlevit_deit_small_ratio0.7.pth``.

    The released IdleViT, EViT and DynamicViT checkpoints are torch files with the weights under
    ``model`` (:func:`read_state_dict` reads them) and timm's names for the backbone; a method's
    own modules are renamed from the official names
    (:meth:`~tokenpatch.core.method.Method.official_module_keys`: DynamicViT's
    ``score_predictor.*``). ``method`` None takes the registered method whose module names the
    file has. The model is left unpatched and unchanged when anything does not fit.

    Raises:
        CheckpointError: the file cannot be read, no ``method`` is given and no method's module
            names are in it; :class:`CheckpointMismatchError` when the backbone or the modules do
            not fit.
    """
    return load_official_state(model, read_state_dict(path), path, method, **options)


def official_method(state: Mapping[str, Tensor]) -> Optional[str]:
    """The registered method whose own modules' official names are among ``state``'s keys, or None."""
    keys = list(state)
    return next((name for name in METHODS if get_method(name).official_module_keys(keys)), None)


def load_official_state(model: ModelT, state: Mapping[str, Tensor], path: PathLike, method: Optional[str] = None,
                        **options: Any) -> ModelT:
    """:func:`load_official` of a state dict already read from ``path`` (named in errors)."""
    if is_patched(model):
        raise AlreadyPatchedError("load_official() expects an unpatched model; call tokenpatch.unpatch(model) first")
    method = method or official_method(state)
    if method is None:
        raise CheckpointError(f"{path}: no method's own module weights in it; name the method it was trained with")
    official = get_method(method)
    renamed = official.official_module_keys(list(state))
    state = {f"{MODULES_NAME}.{renamed[k]}" if k in renamed else k: v for k, v in state.items()}
    options = {**official.official_options, **options}
    check_module_shapes(model, module_shapes(model, method, **options), state, path)
    patch(model, method, **options)
    try:
        load_state(model, state, path)
    except BaseException:
        unpatch(model)
        raise
    return model


def load_weights(model: ModelT, path: PathLike) -> ModelT:
    """Load a plain state dict (:func:`read_state_dict`) into ``model``, strictly.

    Raises:
        CheckpointError: the file cannot be read; :class:`CheckpointMismatchError` when its keys or
            shapes do not fit ``model`` (which is then unchanged).
    """
    load_state(model, read_state_dict(path), path)
    return model


def load_state(model: nn.Module, state: Mapping[str, Tensor], path: PathLike) -> None:
    """``load_state_dict(strict=True)`` after checking every key and shape, so it cannot fail half-way
    (a :class:`CheckpointMismatchError` naming ``path`` and the first mismatches)."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    saved = {k: v.shape for k, v in state.items()}
    if saved != expected:
        _raise_mismatch(model, expected, saved, path)
    model.load_state_dict(state, strict=True)


def check_module_shapes(model: nn.Module, expected: Mapping[str, torch.Size], state: Mapping[str, Tensor],
                        path: PathLike) -> None:
    """A :class:`CheckpointMismatchError` unless the file's method weights (``tokenpatch.*``) are
    the ``expected`` ones: checked before the modules are built, so that sizes in hostile or
    mismatched metadata are never allocated."""
    saved = {k: v.shape for k, v in state.items() if k.startswith(f"{MODULES_NAME}.")}
    if saved != dict(expected):
        _raise_mismatch(model, expected, saved, path)


def _raise_mismatch(model: nn.Module, expected: Mapping[str, torch.Size], saved: Mapping[str, torch.Size],
                    path: PathLike) -> None:
    """The :class:`CheckpointMismatchError` naming the first keys missing, unexpected or of another shape."""
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    wrong = sorted(k for k in set(expected) & set(saved) if expected[k] != saved[k])
    raise CheckpointMismatchError(
        f"{path} does not fit this {type(model).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
        f"shape mismatch {wrong[:5]} (first 5 of each)"
    )


def _check_file(path: PathLike) -> None:
    """A :class:`CheckpointError` unless ``path`` is a non-empty file."""
    file = Path(path)
    if not file.exists():
        raise CheckpointError(f"{path}: no such file")
    if not file.is_file():
        raise CheckpointError(f"{path} is not a file")
    if file.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty")


def _read_safetensors(path: PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a :class:`CheckpointError` if it is not a whole one."""
    _check_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated, or another format): "
                              f"{first_line(exc)}") from exc


def _config_from_text(path: PathLike, text: str) -> dict[str, Any]:
    """The ``{"method": str, "options": dict}`` JSON in ``text``; a :class:`CheckpointError` otherwise."""
    try:
        config = json.loads(text, object_pairs_hook=_without_repeated_keys)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: tokenpatch metadata is not valid JSON ({exc.msg} at char {exc.pos})") from exc
    except (ValueError, RecursionError) as exc:  # a number of thousands of digits; nesting deeper than Python's stack
        raise CheckpointError(f"{path}: tokenpatch metadata is not a configuration tokenpatch reads "
                              f"({type(exc).__name__}: {first_line(exc)[:80]})") from exc
    if (not isinstance(config, dict) or not isinstance(config.get("method"), str)
            or not isinstance(config.get("options"), dict)):
        raise CheckpointError(f"{path}: tokenpatch metadata must be {{\"method\": name, \"options\": {{...}}}}")
    return config


def _without_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict; a key given twice is refused (readers differ on which value wins)."""
    repeated = first_repeated(key for key, _ in pairs)
    if repeated is not None:
        raise ValueError(f"key {repeated!r} given twice")
    return dict(pairs)
