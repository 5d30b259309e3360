"""Labelled image folders and the shared real data (DeiT-Tiny weights, ImageNet sample).

Nothing here downloads: the data directory comes from an argument or the ``TOKENPATCH_DATA``
environment variable.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .backends import find_backend
from .backends.build import timm_twin

DATA_ENV = "TOKENPATCH_DATA"
DEIT_TINY_WEIGHTS = "weights/deit_tiny_patch16_224.safetensors"
IMAGENET_SAMPLE = "imagenet-sample"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

PathLike = Union[str, os.PathLike]


def data_dir(explicit: Optional[PathLike] = None) -> Optional[Path]:
    """The shared data directory: ``explicit``, else ``$TOKENPATCH_DATA``, else None."""
    chosen = explicit if explicit is not None else os.environ.get(DATA_ENV)
    return Path(chosen) if chosen else None


class LabelledImages(Dataset):
    """A flat folder of images with a ``file,class_index`` CSV (extra columns are ignored).

    Items are ``(transform(image), class_index)``.
    """

    def __init__(self, root: PathLike, labels_csv: Optional[PathLike] = None, transform: Optional[Callable] = None) -> None:
        self.root = Path(root)
        csv_path = Path(labels_csv) if labels_csv is not None else self.root / "labels.csv"
        if not csv_path.is_file():
            raise FileNotFoundError(f"no labels file at {csv_path} (expected columns file,class_index)")
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"file", "class_index"} <= set(rows[0]):
            raise ValueError(f"{csv_path} must have the columns file,class_index")
        self.items = [(self.root / r["file"], int(r["class_index"])) for r in rows]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.items[i]
        image = Image.open(path).convert("RGB")
        return (self.transform(image) if self.transform else image), label


class UnlabelledImages(Dataset):
    """Every image file directly in a folder, sorted by name; items are ``(image, -1)``."""

    def __init__(self, root: PathLike, transform: Optional[Callable] = None) -> None:
        self.root = Path(root)
        self.files = sorted(p for p in self.root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {self.root}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image = Image.open(self.files[i]).convert("RGB")
        return (self.transform(image) if self.transform else image), -1


class RememberedItems(Dataset):
    """``dataset`` whose items are read once and then kept in memory: for training epochs over a
    small folder with a fixed transform, where decoding the same images again would be wasted.
    Single-process loading only (each ``DataLoader`` worker would keep its own copy)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.items: dict[int, tuple[Tensor, int]] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        if i not in self.items:
            self.items[i] = self.dataset[i]
        return self.items[i]


def image_dataset(root: PathLike, labels_csv: Optional[PathLike] = None, transform: Optional[Callable] = None) -> Dataset:
    """A dataset of ``(image, label)`` for a folder, whichever layout it has.

    - ``labels_csv`` given, or ``root/labels.csv`` present: :class:`LabelledImages`;
    - class sub-folders: torchvision's ``ImageFolder`` (labels are the sorted folder indices);
    - otherwise a flat folder of images without labels (label -1).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no image folder at {root}")
    if labels_csv is not None or (root / "labels.csv").is_file():
        return LabelledImages(root, labels_csv, transform)
    if any(p.is_dir() for p in root.iterdir()):
        from torchvision.datasets import ImageFolder

        return ImageFolder(str(root), transform=transform)
    return UnlabelledImages(root, transform)


def eval_transform(model: nn.Module) -> Callable:
    """The evaluation transform of ``model``'s data config (resize, crop, normalise; its backend
    knows the config), built with timm's ``create_transform``."""
    from timm.data import create_transform

    return create_transform(**find_backend(model).data_config(model))


def train_transform(model: nn.Module) -> Callable:
    """Light training augmentation for ``model``'s input config: random resized crop (scale 0.35-1)
    and horizontal flip, no colour or erasing. With self-distillation the teacher sees the same
    augmented image, so no labels are needed and the student does not memorise a small folder."""
    from timm.data import create_transform

    config = find_backend(model).data_config(model)
    return create_transform(input_size=config["input_size"], is_training=True, scale=(0.35, 1.0), hflip=0.5,
                            color_jitter=0.0, auto_augment=None, re_prob=0.0, interpolation=config["interpolation"],
                            mean=config["mean"], std=config["std"])


def transform_for(model_spec: str, training: bool = False) -> Callable:
    """The input transform for a ``tokenpatch`` model spec (timm name or ``hf:NAME``, via its timm twin)."""
    reference = timm_twin(model_spec)
    return train_transform(reference) if training else eval_transform(reference)


def normalisation(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per RGB channel that ``model``'s pretrained inputs are normalised with."""
    config = find_backend(model).data_config(model)
    return tuple(config["mean"]), tuple(config["std"])


def load_deit_tiny(root: PathLike) -> nn.Module:
    """The real DeiT-Tiny from the shared data directory, in eval mode (no download)."""
    import timm
    from safetensors.torch import load_file

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    model.load_state_dict(load_file(str(Path(root) / DEIT_TINY_WEIGHTS)), strict=True)
    return model.eval()


def load_images(dataset: Dataset, limit: Optional[int] = None, progress: bool = False) -> tuple[Tensor, Tensor]:
    """All (or the first ``limit``) items of ``dataset`` stacked: (M, 3, H, W) images, (M,) labels."""
    count = len(dataset) if limit is None else min(limit, len(dataset))
    images, labels = zip(*(dataset[i] for i in tqdm(range(count), desc="images", disable=not progress, leave=False)))
    return torch.stack(images), torch.tensor(labels)
