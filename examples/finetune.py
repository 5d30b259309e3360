"""Self-distil a patched ViT on a folder of images (no labels needed), then save it.

    python examples/finetune.py --data ../shared/data/imagenet-sample \\
        --checkpoint ../shared/data/weights/deit_tiny_patch16_224.safetensors --method idle --keep-ratio 0.55

The library calls behind ``tokenpatch finetune``: build and patch the model, a DataLoader over
the folder, ``tokenpatch.training.finetune.finetune`` (a frozen unpatched copy is the teacher), and
``tokenpatch.save``. Load the result with ``tokenpatch.load(fresh_model, path)``.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader

import tokenpatch
from tokenpatch.data import eval_transform, image_dataset
from tokenpatch.backends.build import build_timm_model
from tokenpatch.checkpoint import load_weights
from tokenpatch.training.finetune import FinetuneConfig, finetune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="image folder (flat, class sub-folders, or with labels.csv)")
    parser.add_argument("--model", default="deit_tiny_patch16_224")
    parser.add_argument("--checkpoint", help="pretrained weights of the unpatched model")
    parser.add_argument("--method", default="idle")
    parser.add_argument("--keep-ratio", type=float, default=0.55)
    parser.add_argument("--steps", type=int, default=FinetuneConfig.steps)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="finetuned.safetensors")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build_timm_model(args.model)
    if args.checkpoint:
        load_weights(model, args.checkpoint)
    tokenpatch.patch(model, args.method, keep_ratio=args.keep_ratio)

    images = image_dataset(args.data, transform=eval_transform(model))
    loader = DataLoader(images, batch_size=args.batch_size, shuffle=True)
    history = finetune(model, loader, FinetuneConfig(steps=args.steps))  # the measured defaults
    print(f"loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f} after {args.steps} steps")

    tokenpatch.save(model, args.out)
    print(f"saved {args.method}@{args.keep_ratio} to {args.out}")


if __name__ == "__main__":
    main()
