"""The real DeiT-Tiny in timm and, with the same weights, in transformers: patched alike, compared.

    python benchmarks/cross_backend.py --data ../shared/data --images 100

Prints, per method setting, whether both backends selected the same tokens in every block and
the largest logit difference. The key mapping is the test utility ``tests/hf_convert.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from tokenpatch.data import IMAGENET_SAMPLE, LabelledImages, eval_transform, load_deit_tiny, load_images
from tokenpatch.measure.report import format_table

from shared_data import add_data_option, shared_data

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hf_convert import compare_patched, hf_twin  # noqa: E402

SETTINGS = [("idle", 0.5, {}), ("idle", 0.7, {"schedule": "geometric"}), ("evit", 0.7, {}), ("evit", 0.5, {"fuse": True})]


def compare(timm_model: torch.nn.Module, hf_model: torch.nn.Module, x: torch.Tensor, method: str, ratio: float,
            options: dict) -> dict:
    """One table row: both backends patched alike on ``x``."""
    same, diff = compare_patched(timm_model, hf_model, x, method, ratio, options)
    return dict(method=method, keep_ratio=ratio, options=str(options or "-"), same_tokens=same, max_logit_diff=diff)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_option(parser)
    parser.add_argument("--images", type=int, default=100)
    args = parser.parse_args(argv)
    root = shared_data(parser, args)
    timm_model = load_deit_tiny(root)
    hf_model = hf_twin(timm_model)
    x, _ = load_images(LabelledImages(root / IMAGENET_SAMPLE, transform=eval_transform(timm_model)), args.images)
    with torch.no_grad():
        print(f"unpatched max |logit diff| on {len(x)} images: {(timm_model(x) - hf_model(x).logits).abs().max().item():.3g}")
    print(format_table([compare(timm_model, hf_model, x, *s) for s in SETTINGS], digits=6))
    return 0


if __name__ == "__main__":
    sys.exit(main())
