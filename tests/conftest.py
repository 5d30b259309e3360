"""Shared fixtures: small timm ViTs (random weights, no download) and the optional real data."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import timm
import torch

import tokenpatch  # noqa: F401  (registers the built-in methods)
from tokenpatch.core.registry import METHODS
from tokenpatch.data import data_dir

torch.set_num_threads(min(2, torch.get_num_threads()))

# Small versions (depth 4, 64 px images) of every architecture the timm backend must support.
SMALL_MODELS = {
    "deit_tiny": ("deit_tiny_patch16_224", {}),
    "deit_small": ("deit_small_patch16_224", {"embed_dim": 96, "num_heads": 6}),
    "deit_base": ("deit_base_patch16_224", {"embed_dim": 96, "num_heads": 12}),
    "deit_tiny_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "vit_small_augreg": ("vit_small_patch16_224", {"embed_dim": 96}),
    "vit_reg4": ("vit_small_patch14_reg4_dinov2", {"embed_dim": 96, "img_size": 56}),
    "deit3_layerscale": ("deit3_small_patch16_224", {"embed_dim": 96, "init_values": 0.3}),
    "qk_norm": ("vit_small_patch16_224", {"embed_dim": 96, "qk_norm": True}),
    "avg_pool": ("deit_small_patch16_224", {"embed_dim": 96, "global_pool": "avg"}),
    "img_96": ("deit_tiny_patch16_224", {"img_size": 96}),
    "dynamic_img_size": ("deit_tiny_patch16_224", {"dynamic_img_size": True}),
}


# (method, options): every registered method with its defaults, then each of its variants.
METHOD_CASES = [(name, {}) for name in sorted(METHODS)] + [
    (name, options) for name in sorted(METHODS) for options in METHODS[name].variants.values()
]


def case_id(case) -> str:
    """A readable test id for a (method, options) case."""
    name, options = case
    return name + "".join(f"-{k}={v}" for k, v in options.items())


def fixed_counts(case) -> bool:
    """True when the case keeps image-independent token counts (traceable, exportable)."""
    name, options = case
    return METHODS[name].fixed_token_counts(METHODS[name].config_class(**options))


def pads_batches(case) -> bool:
    """True when the case pads batches to per-image counts (refused for average-pooling models)."""
    return not fixed_counts(case)


def make_model(key: str, depth: int = 4, **overrides) -> torch.nn.Module:
    """A small random-weight model of the named kind, in eval mode, seeded."""
    name, kwargs = SMALL_MODELS[key]
    torch.manual_seed(0)
    kwargs = {"img_size": 64, "depth": depth, "num_classes": 10, **kwargs, **overrides}
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    # timm initialises heads near zero; unit-scale logits make absolute tolerances meaningful.
    for head in (model.head, getattr(model, "head_dist", None)):
        if isinstance(head, torch.nn.Linear):
            torch.nn.init.normal_(head.weight, std=head.in_features**-0.5)
    return model


def image_size(model: torch.nn.Module) -> int:
    return int(model.patch_embed.img_size[0])


def images(model: torch.nn.Module, batch: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    size = image_size(model)
    return torch.randn(batch, 3, size, size, generator=g)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real data directory, or skip the test with the reason."""
    root = data_dir()
    if root is None:
        pytest.skip("real-data test: set TOKENPATCH_DATA to the folder holding weights/ and imagenet-sample/")
    if not (root / "weights" / "deit_tiny_patch16_224.safetensors").is_file():
        pytest.skip(f"real-data test: no weights/deit_tiny_patch16_224.safetensors under TOKENPATCH_DATA={root}")
    return root
