"""Building models by name for the command line: timm names, and ``hf:`` twins of them.

Nothing here downloads: timm models get random weights (or a checkpoint), and an ``hf:NAME``
model is a transformers ViT/DeiT built from the config of timm's ``NAME`` architecture.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from ..errors import TokenPatchError

HF_PREFIX = "hf:"


def build_timm_model(name: str, img_size: Optional[int] = None) -> nn.Module:
    """A timm model with random weights, in eval mode (never downloads)."""
    import timm

    if not timm.is_model(name):
        raise TokenPatchError(f"unknown timm model {name!r} (see timm.list_models())")
    kwargs = {"img_size": img_size} if img_size else {}
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def hf_config_from_timm(timm_model: nn.Module):
    """The transformers ``ViTConfig`` (one prefix token) or ``DeiTConfig`` (two) of a timm ViT/DeiT."""
    import transformers

    prefix = timm_model.num_prefix_tokens
    if prefix not in (1, 2) or getattr(timm_model, "reg_token", None) is not None:
        raise TokenPatchError(f"no transformers ViT/DeiT layout has {prefix} prefix tokens")
    config_class = transformers.DeiTConfig if prefix == 2 else transformers.ViTConfig
    block = timm_model.blocks[0]
    return config_class(
        hidden_size=timm_model.embed_dim,
        num_hidden_layers=len(timm_model.blocks),
        num_attention_heads=block.attn.num_heads,
        intermediate_size=block.mlp.fc1.out_features,
        image_size=timm_model.patch_embed.img_size[0],
        patch_size=timm_model.patch_embed.patch_size[0],
        num_labels=timm_model.num_classes,
        layer_norm_eps=block.norm1.eps,
        hidden_act="gelu",
        qkv_bias=block.attn.qkv.bias is not None,
    )


def build_hf_model(name: str, img_size: Optional[int] = None) -> nn.Module:
    """``ViTForImageClassification`` or ``DeiTForImageClassificationWithTeacher`` shaped like timm's ``name``."""
    import transformers

    config = hf_config_from_timm(build_timm_model(name, img_size))
    model_class = (transformers.DeiTForImageClassificationWithTeacher if isinstance(config, transformers.DeiTConfig)
                   else transformers.ViTForImageClassification)
    return model_class(config).eval()


def build_model(spec: str, img_size: Optional[int] = None) -> nn.Module:
    """``NAME`` (timm) or ``hf:NAME`` (its transformers twin), random weights, eval mode."""
    if spec.startswith(HF_PREFIX):
        return build_hf_model(spec[len(HF_PREFIX):], img_size)
    return build_timm_model(spec, img_size)


def timm_twin(model_spec: str, img_size: Optional[int] = None) -> nn.Module:
    """The timm model a ``tokenpatch`` model spec names (``hf:NAME``: its timm twin), for input configs."""
    return build_timm_model(model_spec[len(HF_PREFIX):] if model_spec.startswith(HF_PREFIX) else model_spec, img_size)
