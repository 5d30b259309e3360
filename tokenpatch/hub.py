"""Patched transformers models as ``save_pretrained`` folders and Hub repositories.

``model.save_pretrained(folder)`` of a patched transformers model writes the model as transformers
does and, beside it, the tokenpatch config and the method's own weights
(:mod:`tokenpatch.core.sidecar`); :func:`from_pretrained` gives the patched model back, from the
folder or from the Hub through huggingface_hub's cache. A plain transformers ``from_pretrained``
of the same folder loads the unpatched model. timm models save and load with
:func:`tokenpatch.save` / :func:`tokenpatch.load`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

from torch import nn

from .checkpoint import load_config, patch_as_saved, read_state_dict
from .core.runner import MODULES_NAME
from .core.sidecar import CONFIG_FILE, MODULES_FILE
from .errors import CheckpointError, TokenPatchError, first_line

Source = Union[str, os.PathLike]


def from_pretrained(path_or_hub_id: Source, model_class: Optional[type] = None, *, revision: Optional[str] = None,
                    **kwargs: Any) -> nn.Module:
    """The patched transformers model a ``save_pretrained`` of it wrote, patched as it was saved.

    Args:
        path_or_hub_id: a local folder, or ``ORG/NAME`` on the Hub (read through huggingface_hub's
            cache; with ``HF_HUB_OFFLINE=1`` from the cache only).
        model_class: the transformers class to load with (default: the one ``config.json`` names
            under ``architectures``, the saved model's own class).
        revision: a branch, tag or commit of a Hub repository.
        **kwargs: passed on to ``model_class.from_pretrained`` (e.g. ``dtype``).

    Returns:
        The model, patched with the saved method and options, the method's own weights loaded.

    Raises:
        CheckpointError: there is no ``tokenpatch_config.json`` (a plain transformers model: load
            it with transformers and call :func:`tokenpatch.patch`), or it cannot be read;
            :class:`~tokenpatch.errors.CheckpointMismatchError` when the saved method, options or
            module weights do not fit the model.
    """
    transformers = _transformers()
    where = str(path_or_hub_id)
    config_file = _fetch(path_or_hub_id, CONFIG_FILE, revision)
    if config_file is None:
        raise CheckpointError(f"{where} has no {CONFIG_FILE}: it is not a patched model; load it with transformers "
                              "and call tokenpatch.patch")
    config = load_config(config_file)
    model_class = model_class or _saved_class(transformers, path_or_hub_id, revision)
    model = model_class.from_pretrained(path_or_hub_id, revision=revision, **kwargs)
    modules_file = _fetch(path_or_hub_id, MODULES_FILE, revision)
    modules = {} if modules_file is None else read_state_dict(modules_file)
    patch_as_saved(model, config, {f"{MODULES_NAME}.{k}": v for k, v in modules.items()}, where)
    if modules:  # keys and shapes checked: cannot fail half-way
        model.get_submodule(MODULES_NAME).load_state_dict(modules, strict=True)
    return model


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise TokenPatchError("from_pretrained needs transformers: pip install 'tokenpatch[hf]'") from exc
    return transformers


def _fetch(source: Source, filename: str, revision: Optional[str]) -> Optional[Path]:
    """``filename`` of a local folder, or of a Hub repository through huggingface_hub's cache; None when absent."""
    if Path(source).is_dir():
        path = Path(source) / filename
        return path if path.is_file() else None
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(huggingface_hub.hf_hub_download(str(source), filename, revision=revision))
    except LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError) offline, and not in the cache
        if huggingface_hub.try_to_load_from_cache(str(source), "config.json", revision=revision) is None:
            raise CheckpointError(f"{source} is not in the Hugging Face cache and the Hub cannot be reached "
                                  "(HF_HUB_OFFLINE, or no network)") from None
        return None  # the repository is cached, this optional file is not
    except EntryNotFoundError:
        return None
    except (HfHubHTTPError, ValueError, OSError) as exc:  # no such repository, a malformed id, an unreadable cache
        raise CheckpointError(f"cannot read {filename} of {source}: {first_line(exc)}") from exc


def _saved_class(transformers: Any, source: Source, revision: Optional[str]) -> type:
    """The transformers class ``config.json`` names as the saved model's (its first ``architectures``)."""
    config = transformers.AutoConfig.from_pretrained(source, revision=revision)
    name = (config.architectures or [None])[0]
    model_class = getattr(transformers, name, None) if name else None
    if model_class is None:
        raise CheckpointError(f"{source}: config.json names no transformers model class ({name!r}); "
                              "pass model_class=")
    return model_class
