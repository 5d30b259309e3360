"""What the real-data benchmarks share: their common flags, the real DeiT-Tiny with the sample images, the report."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from torch import Tensor, nn

from tokenpatch.data import IMAGENET_SAMPLE, LabelledImages, input_transform, load_deit_tiny, load_images, preprocessing_of
from tokenpatch.measure.report import format_table, write_json

from shared_data import add_data_option, shared_data


def add_real_data_flags(parser: argparse.ArgumentParser, json_help: str = "also write the rows to this JSON file") -> None:
    """``--data``, ``--limit``, ``--img-size``, ``--threads`` and ``--json``."""
    add_data_option(parser)
    parser.add_argument("--limit", type=int, help="use only the first N images")
    parser.add_argument("--img-size", type=int, default=224,
                        help="input size: other than 224 the model takes any size (timm's dynamic_img_size, the "
                        "position embeddings resampled) and the images are resized and cropped to it")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help=json_help)


def load_real_data(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[nn.Module, Tensor, Tensor]:
    """The real DeiT-Tiny and the (B, 3, S, S) sample images (S: ``--img-size``) with their (B,)
    labels; a usage error when the shared data is missing."""
    root = shared_data(parser, args)
    torch.set_num_threads(args.threads)
    model = load_deit_tiny(root, dynamic_img_size=args.img_size != 224)
    preprocessing = preprocessing_of(model)
    preprocessing.data_config["input_size"] = (3, args.img_size, args.img_size)
    images, labels = load_images(LabelledImages(root / IMAGENET_SAMPLE, transform=input_transform(preprocessing)),
                                 args.limit)
    return model, images, labels


def show_row(rows: list[dict[str, Any]]) -> None:
    """Print the newest row to stderr as it is measured (the table comes at the end)."""
    print(format_table(rows[-1:], digits=3).splitlines()[-1], file=sys.stderr, flush=True)


def report(title: str, rows: list[dict[str, Any]], args: argparse.Namespace, **facts: Any) -> None:
    """Print the title and the table; write ``{model, **facts, rows}`` to ``args.json`` if given."""
    print(title)
    print(format_table(rows, digits=3))
    if args.json:
        write_json({"model": "deit_tiny_patch16_224", "command": " ".join(sys.argv), "img_size": args.img_size,
                    **facts, "rows": rows}, args.json)
