"""Models by the names users give them, with their weights and their input preprocessing.

- a timm name (``deit_small_patch16_224``, ``vit_base_patch16_224.augreg_in21k``) or timm's own
  ``hf-hub:ORG/NAME`` and ``local-dir:PATH``: ``timm.create_model``, pretrained weights through
  timm (the Hugging Face Hub and its cache) unless random weights are asked for;
- ``hf:ORG/NAME`` or ``hf:PATH`` (a ``save_pretrained`` folder): a transformers model through its
  Auto classes (the image classifier where the checkpoint has one, else its vision encoder) and
  its own image processor.

Downloads go through timm, transformers and huggingface_hub, so their cache and
``HF_HUB_OFFLINE=1`` work as they do for those libraries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..errors import TokenPatchError, first_line

HF_PREFIX = "hf:"
#: model names timm resolves itself (a Hub repository, a local folder with timm's config.json)
TIMM_SOURCE_PREFIXES = ("hf-hub:", "local-dir:")
#: the seed of random weights (``pretrained=False``), so that every process and run builds the same model
RANDOM_WEIGHTS_SEED = 0
_OFFLINE_HINT = ("(offline, HF_HUB_OFFLINE=1, it must be in the Hugging Face cache); give --checkpoint FILE, "
                 "or --no-pretrained for random weights")


@dataclass(frozen=True)
class Preprocessing:
    """How a model's images are prepared: timm's data config (``input_size`` (C, H, W),
    ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``) and, for a transformers
    checkpoint, its own image processor (which then prepares the evaluation images)."""

    data_config: dict[str, Any]
    processor: Optional[Any] = None


@dataclass
class BuiltModel:
    """A model in eval mode, how its inputs are prepared, and whether its weights are pretrained."""

    model: nn.Module
    preprocessing: Preprocessing
    pretrained: bool


def preprocessing_of(model: nn.Module) -> Preprocessing:
    """``model``'s data config as its backend knows it (timm models; a transformers model keeps its
    preprocessing in its image processor, which :func:`build_model` loads with it)."""
    from . import find_backend

    return Preprocessing(find_backend(model).data_config(model))


def build_model(spec: str, img_size: Optional[int] = None, pretrained: bool = True,
                drop_path: Optional[float] = None) -> BuiltModel:
    """The model ``spec`` names (see the module docstring), in eval mode.

    Args:
        img_size: build a timm model for this input size (pretrained position embeddings are
            resampled by timm); not for ``hf:`` models.
        drop_path: stochastic depth rate of the last block (timm's ``drop_path_rate``, rising
            linearly from 0 over the blocks; a transformers config's ``drop_path_rate``), active in
            training mode only; None keeps the model's own.
        pretrained: load the published weights; False builds random weights, seeded with
            :data:`RANDOM_WEIGHTS_SEED` (the global random state is left as it was).

    Raises:
        TokenPatchError: an unknown name, a name without published weights, weights that cannot
            be had (offline and not cached), a model tokenpatch cannot patch; one line.
    """
    from . import find_backend

    if spec.startswith(HF_PREFIX) and img_size:
        raise TokenPatchError("--img-size is for timm models; a transformers checkpoint (hf:) keeps its own size")
    with torch.random.fork_rng(devices=[]):  # random weights are the same in every process (torchrun) and run
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        if spec.startswith(HF_PREFIX):
            built = _build_transformers_model(spec[len(HF_PREFIX):], pretrained, drop_path)
        else:
            model = build_timm_model(spec, img_size, pretrained, drop_path)
            built = BuiltModel(model, preprocessing_of(model), pretrained)
    find_backend(built.model)  # a model tokenpatch cannot patch is refused here, by name
    return built


def build_timm_model(name: str, img_size: Optional[int] = None, pretrained: bool = False,
                     drop_path: Optional[float] = None) -> nn.Module:
    """A timm model in eval mode; ``pretrained`` loads its published weights through timm;
    ``drop_path`` is timm's ``drop_path_rate``."""
    import timm

    is_source = name.startswith(TIMM_SOURCE_PREFIXES)
    if not is_source and not timm.is_model(name):
        raise TokenPatchError(f"unknown timm model {name!r} (see timm.list_models())")
    if pretrained and not is_source and not _has_published_weights(name):
        raise TokenPatchError(f"timm publishes no weights for {name!r} (see timm.list_pretrained()); "
                              "give --checkpoint FILE, or --no-pretrained for random weights")
    kwargs = ({"img_size": img_size} if img_size else {}) | (
        {"drop_path_rate": drop_path} if drop_path is not None else {})
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:  # not downloadable, not cached, or not loadable
        what = "the pretrained weights" if pretrained else "the config"
        raise TokenPatchError(f"cannot load {what} of {name!r} through timm ({first_line(exc)}) "
                              f"{_OFFLINE_HINT}") from exc
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    side = patch[0] if isinstance(patch, (tuple, list)) else patch
    if img_size and isinstance(side, int) and img_size % side:  # timm would crop the border or fail in the conv
        raise TokenPatchError(f"img_size {img_size} is not a multiple of {name}'s patch size {side}")
    return model.eval()


def _with_drop_path(model_config: Any, source: str, rate: float) -> Any:
    """The transformers config the model is built from, with stochastic depth ``rate``."""
    if not hasattr(model_config, "drop_path_rate"):
        raise TokenPatchError(f"{source}: its transformers model has no stochastic depth (drop_path_rate) to set")
    model_config.drop_path_rate = rate
    return model_config


def _has_published_weights(name: str) -> bool:
    """True when timm knows where ``name``'s weights are (timm would otherwise warn and keep random ones)."""
    from timm.models import get_pretrained_cfg

    try:
        config = get_pretrained_cfg(name)
    except RuntimeError:  # a tag timm does not know
        return False
    return config is not None and any((config.hf_hub_id, config.url, config.file, config.state_dict))


def _build_transformers_model(source: str, pretrained: bool, drop_path: Optional[float] = None) -> BuiltModel:
    """A transformers checkpoint (Hub id or folder) as :func:`_loader_of` picks its class, with its image processor."""
    try:
        import transformers
    except ImportError as exc:
        raise TokenPatchError("hf: models need transformers: pip install 'tokenpatch[hf]'") from exc
    if source.startswith(("/", ".", "~")) and not Path(source).expanduser().is_dir():
        raise TokenPatchError(f"hf:{source}: no such folder (a transformers save_pretrained folder, "
                              "or a Hub id ORG/NAME)")
    try:
        config = transformers.AutoConfig.from_pretrained(source)
        loader, model_config = _loader_of(config)
        given = {} if drop_path is None else {"config": _with_drop_path(model_config, source, drop_path)}
        if pretrained:
            model = loader.from_pretrained(source, **given)
        else:  # an Auto class builds from a config with from_config, a model class by its constructor
            model = loader.from_config(model_config) if hasattr(loader, "from_config") else loader(model_config)
        processor = transformers.AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError, KeyError) as exc:  # no such repository or folder, not cached, not an image model
        raise TokenPatchError(f"cannot load the transformers checkpoint {source!r} ({first_line(exc)}) "
                              f"{_OFFLINE_HINT}") from exc
    return BuiltModel(model.eval(), Preprocessing(processor_data_config(processor), processor), pretrained)


def _loader_of(config: Any) -> tuple[Any, Any]:
    """(what loads the checkpoint, the config its model is built from): the image classifier its
    architectures name (``AutoModelForImageClassification`` picks the named one, e.g. DeiT with
    teacher), else the vision encoder of an image-text checkpoint (CLIP, SigLIP: the part
    tokenpatch runs), else its base model (``AutoModel``)."""
    import transformers

    if any("ForImageClassification" in name for name in (config.architectures or ())):
        return transformers.AutoModelForImageClassification, config
    vision = getattr(config, "vision_config", None)
    if vision is not None:
        return transformers.MODEL_MAPPING[type(vision)], vision
    return transformers.AutoModel, config


_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def processor_data_config(processor: Any) -> dict[str, Any]:
    """timm's data config equivalent of a transformers image processor's resize, crop and normalisation
    (what training augmentation and de-normalising a picture need; evaluation uses the processor itself)."""
    size = processor.size
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    final = crop or size
    height, width = (final.height, final.width) if final.height else (final.shortest_edge, final.shortest_edge)
    resized = size.shortest_edge or size.height
    return {
        "input_size": (3, height, width),
        "interpolation": _PIL_RESAMPLE.get(int(getattr(processor, "resample", None) or 3), "bicubic"),
        "mean": tuple(processor.image_mean),
        "std": tuple(processor.image_std),
        "crop_pct": height / resized if crop else 1.0,
        "crop_mode": "center" if size.shortest_edge else "squash",
    }
