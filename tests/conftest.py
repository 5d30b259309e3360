"""Shared fixtures: small timm ViTs (random weights, no download) and the optional real data."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import timm
import torch

import tokenpatch.methods  # noqa: F401  (registers the built-in methods: the package itself imports lazily)
from tokenpatch.core.registry import METHODS
from tokenpatch.data import data_dir

# Under pytest-xdist (-n N) the workers share the cores: threads beyond a worker's share only wait on each other.
torch.set_num_threads(max(1, min(2, torch.get_num_threads()) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

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


def random_folder_and_weights(root: Path, count: int) -> tuple[Path, Path]:
    """A flat folder of ``count`` unlabelled random 40 px images and random DeiT-Tiny weights under
    ``root``: (data dir, weights file)."""
    from PIL import Image
    from safetensors.torch import save_file

    from tokenpatch.backends.build import build_timm_model

    data = root / "images"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        pixels = (torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(data / f"{i}.png")
    weights = root / "weights.safetensors"
    save_file(build_timm_model("deit_tiny_patch16_224").state_dict(), str(weights))
    return data, weights


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real data directory, or skip the test with the reason."""
    root = data_dir()
    if root is None:
        pytest.skip("real-data test: set TOKENPATCH_DATA to the folder holding weights/ and imagenet-sample/")
    if not (root / "weights" / "deit_tiny_patch16_224.safetensors").is_file():
        pytest.skip(f"real-data test: no weights/deit_tiny_patch16_224.safetensors under TOKENPATCH_DATA={root}")
    return root


# Small versions of every timm family beyond ViT/DeiT (depth 4, 64 px, width 96). Layer scale
# starts at 0.3 where a family has it, so that every block changes its tokens visibly.
FAMILY_MODELS = {
    "siglip_map_head": ("vit_base_patch16_siglip_224", {}),
    "gap_registers": ("vit_medium_patch16_reg4_gap_256", {"init_values": 0.3}),
    "eva02": ("eva02_tiny_patch14_224", {"patch_size": 16}),
    "eva02_clip": ("eva02_base_patch16_clip_224", {}),
    "eva_postnorm": ("eva02_enormous_patch14_clip_224", {"patch_size": 16}),
    "dinov3": ("vit_small_patch16_dinov3", {"init_values": 0.3}),
    "rope": ("vit_base_patch16_rope_224", {"init_values": 0.3}),
    "rope_mixed": ("vit_base_patch16_rope_mixed_224", {"init_values": 0.3}),
    "rope_gap_register": ("vit_base_patch16_rope_reg1_gap_256", {"init_values": 0.3}),
    "perception_encoder": ("vit_pe_core_base_patch16_224", {"init_values": 0.3}),
    "beit": ("beit_base_patch16_224", {"init_values": 0.3}),
    "beit_shared_bias": ("beit_base_patch16_224", {"init_values": 0.3, "use_shared_rel_pos_bias": True,
                                                   "use_rel_pos_bias": False}),
    "beitv2": ("beitv2_base_patch16_224", {"init_values": 0.3}),
    "relpos": ("vit_relpos_base_patch16_224", {"init_values": 0.3}),
    "relpos_post_norm": ("vit_relpos_base_patch32_plus_rpn_256", {"patch_size": 16, "init_values": 0.3}),
    "relpos_class_token": ("vit_relpos_medium_patch16_cls_224", {"init_values": 0.3}),
    "shared_relpos": ("vit_srelpos_medium_patch16_224", {"init_values": 0.3}),
    "naflex_gap": ("naflexvit_base_patch16_gap", {"init_values": 0.3}),
    "naflex_siglip": ("naflexvit_base_patch16_siglip", {"init_values": 0.3}),
    "naflex_radio": ("naflexvit_base_patch16_radio_v3", {"init_values": 0.3}),
}


def make_family_model(key: str) -> torch.nn.Module:
    """A small random-weight model of the named family, in eval mode, seeded."""
    name, kwargs = FAMILY_MODELS[key]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=64, depth=4, num_classes=10,
                              **{"embed_dim": 96, "num_heads": 4, **kwargs}).eval()
    torch.nn.init.normal_(model.head.weight, std=model.head.in_features**-0.5)
    return model


def block_calls(model: torch.nn.Module, run) -> tuple:
    """(backend, [(block, input tokens, its other arguments such as rotary tables)]) of every block
    call while ``run(model)`` runs."""
    from tokenpatch.backends import find_backend

    backend, calls = find_backend(model), []

    def capture(block, args, kwargs):
        calls.append((block, *backend.block_input(args, dict(kwargs))))

    handles = [b.register_forward_pre_hook(capture, with_kwargs=True) for b in backend.blocks(model)]
    try:
        with torch.no_grad():
            run(model)
    finally:
        for handle in handles:
            handle.remove()
    return backend, calls
