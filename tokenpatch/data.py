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
from .errors import DataError

DATA_ENV = "TOKENPATCH_DATA"
DEIT_TINY_WEIGHTS = "weights/deit_tiny_patch16_224.safetensors"
IMAGENET_SAMPLE = "imagenet-sample"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

PathLike = Union[str, os.PathLike]


def data_dir(explicit: Optional[PathLike] = None) -> Optional[Path]:
    """The shared data directory: ``explicit``, else ``$TOKENPATCH_DATA``, else None."""
    chosen = explicit if explicit is not None else os.environ.get(DATA_ENV)
    return Path(chosen) if chosen else None


def read_image(path: PathLike) -> Image.Image:
    """The RGB image in the file ``path``, decoded.

    Raises:
        DataError: naming the path: no such file, a folder, or not a readable image (truncated,
            another format).
    """
    file = Path(path)
    if not file.exists():
        raise DataError(f"{path}: no such image file")
    if file.is_dir():
        raise DataError(f"{path} is a folder; give image files")
    try:
        with Image.open(file) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:  # what PIL raises for bad files
        raise DataError(f"cannot read image {path}: {exc}") from exc


class LabelledImages(Dataset):
    """A flat folder of images with a ``file,class_index`` CSV (extra columns are ignored).

    Items are ``(transform(image), class_index)``.
    """

    def __init__(self, root: PathLike, labels_csv: Optional[PathLike] = None, transform: Optional[Callable] = None) -> None:
        self.root = Path(root)
        csv_path = Path(labels_csv) if labels_csv is not None else self.root / "labels.csv"
        self.items = _read_labels(csv_path, self.root)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.items[i]
        image = read_image(path)
        return (self.transform(image) if self.transform else image), label


def _read_labels(csv_path: Path, root: Path) -> list[tuple[Path, int]]:
    """(image path, class index) per row of a ``file,class_index`` CSV; a :class:`DataError` naming the problem."""
    if not csv_path.is_file():
        raise DataError(f"no labels file at {csv_path} (expected columns file,class_index)")
    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{csv_path} is not a CSV file ({exc})") from exc
    if not rows or not {"file", "class_index"} <= set(rows[0]):
        raise DataError(f"{csv_path} must have the columns file,class_index and at least one row")
    bad = [r["class_index"] for r in rows if not (r["class_index"] or "").strip().isdigit()]
    if bad:
        raise DataError(f"{csv_path}: class_index must be a non-negative integer, got {bad[0]!r}")
    return [(root / r["file"], int(r["class_index"])) for r in rows]


class UnlabelledImages(Dataset):
    """Every image file directly in a folder, sorted by name; items are ``(image, -1)``."""

    def __init__(self, root: PathLike, transform: Optional[Callable] = None) -> None:
        self.root = Path(root)
        self.files = sorted(p for p in self.root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {self.root}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image = read_image(self.files[i])
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
        raise DataError(f"no image folder at {root}")
    if labels_csv is not None or (root / "labels.csv").is_file():
        return LabelledImages(root, labels_csv, transform)
    if any(p.is_dir() for p in root.iterdir()):
        from torchvision.datasets import ImageFolder

        try:
            return ImageFolder(str(root), transform=transform, loader=read_image)
        except FileNotFoundError as exc:  # class folders without images
            raise DataError(f"{root}: {exc}") from exc
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


def transform_for(model_spec: str, training: bool = False, img_size: Optional[int] = None) -> Callable:
    """The input transform for a ``tokenpatch`` model spec (timm name or ``hf:NAME``, via its timm twin)
    built with ``img_size`` (default: the model's)."""
    reference = timm_twin(model_spec, img_size)
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
    with tqdm(range(count), desc="images", disable=not progress, leave=False) as indices:  # erased on errors too
        images, labels = zip(*(dataset[i] for i in indices))
    return torch.stack(images), torch.tensor(labels)
