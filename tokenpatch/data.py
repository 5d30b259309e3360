"""Labelled image folders and the shared real data (DeiT-Tiny weights, ImageNet sample).

Nothing here downloads: the data directory comes from an argument or the ``TOKENPATCH_DATA``
environment variable.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from PIL import Image, ImageOps
from torch import Tensor, nn
from torch.utils.data import Dataset

from .backends.build import Preprocessing, preprocessing_of
from .errors import DataError, InvalidOptionError, shown
from .progress import progress_bar

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
        self.csv_path = Path(labels_csv) if labels_csv is not None else self.root / "labels.csv"
        self.items = _read_labels(self.csv_path, self.root)
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
        with open(csv_path, newline="", encoding="utf-8-sig") as f:  # spreadsheets often start the file with a BOM
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{csv_path} is not a CSV file ({exc})") from exc
    if not rows or not {"file", "class_index"} <= set(rows[0]):
        raise DataError(f"{csv_path} must have the columns file,class_index and at least one row")
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        if not row["file"] or row["class_index"] is None:
            raise DataError(f"{csv_path} line {line}: expected file,class_index, got {shown(list(row.values()), 60)}")
        if not re.fullmatch(r"[0-9]+", row["class_index"].strip()):  # ASCII digits: "²".isdigit() is True
            raise DataError(f"{csv_path} line {line}: class_index must be a non-negative integer, "
                            f"got {shown(row['class_index'], 60)}")
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


def has_labels(dataset: Dataset) -> bool:
    """False for a folder without labels (:class:`UnlabelledImages`, however wrapped in subsets)."""
    while not isinstance(dataset, UnlabelledImages) and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return not isinstance(dataset, UnlabelledImages)


def image_dataset(root: PathLike, labels_csv: Optional[PathLike] = None, transform: Optional[Callable] = None,
                  num_classes: Optional[int] = None, class_map: Optional[PathLike] = None) -> Dataset:
    """A dataset of ``(image, label)`` for a folder, whichever layout it has.

    - ``labels_csv`` given, or ``root/labels.csv`` present: :class:`LabelledImages`;
    - class sub-folders: torchvision's ``ImageFolder``, its labels put in the model's label space
      when ``num_classes`` (the model's head size) is given: through ``class_map`` (timm's format:
      one class name per line, in the model's label order), else as ImageNet WordNet ids
      (``n01440764``) by timm's table of the ImageNet variant with ``num_classes`` classes.
      Without ``num_classes`` or ``class_map``, the sorted folder indices (torchvision's convention);
    - otherwise a flat folder of images without labels (label -1).

    Raises:
        DataError: no such folder, no images, or labels that cannot be put in the model's label
            space (unknown class names, an index beyond ``num_classes``); one line.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"no image folder at {root}")
    if labels_csv is not None or (root / "labels.csv").is_file():
        dataset = LabelledImages(root, labels_csv, transform)
        _check_in_label_space((label for _, label in dataset.items), num_classes, dataset.csv_path)
        return dataset
    if any(p.is_dir() for p in root.iterdir()):
        from torchvision.datasets import ImageFolder

        try:
            dataset = ImageFolder(str(root), transform=transform, loader=read_image)
        except FileNotFoundError as exc:  # class folders without images
            raise DataError(f"{root}: {exc}") from exc
        if num_classes is not None or class_map is not None:
            _relabel(dataset, class_indices(dataset.classes, num_classes, class_map, root))
        return dataset
    if class_map is not None:
        raise DataError(f"{root} has no class sub-folders for the class map {class_map} to name")
    return UnlabelledImages(root, transform)


def class_indices(names: Sequence[str], num_classes: Optional[int], class_map: Optional[PathLike],
                  root: PathLike) -> dict[str, int]:
    """The model's label index of each class folder name: through ``class_map`` (one name per line,
    timm's ``--class-map`` text format), else as ImageNet WordNet ids.

    Raises:
        DataError: a name the map or ImageNet's table lacks, or an index beyond ``num_classes``.
    """
    if class_map is not None:
        table, source = _read_class_map(Path(class_map)), f"the class map {class_map}"
    else:
        table, source = _imagenet_table(names, num_classes, root), "ImageNet's WordNet ids"
    unknown = [n for n in names if n not in table]
    if unknown:
        raise DataError(f"{root}: {len(unknown)} class folder(s) not in {source}, e.g. {unknown[0]!r}; "
                        f"give --class-map FILE {_CLASS_MAP_FORMAT} or a labels.csv")
    indices = {n: table[n] for n in names}
    _check_in_label_space(indices.values(), num_classes, source)
    return indices


_CLASS_MAP_FORMAT = "(one class name per line, in the model's label order)"
_WORDNET_ID = re.compile(r"n\d{8}")


def _imagenet_table(names: Sequence[str], num_classes: Optional[int], root: PathLike) -> dict[str, int]:
    """WordNet id -> label index in the ImageNet variant (timm's tables) with ``num_classes`` classes."""
    from timm.data import ImageNetInfo
    from timm.data.imagenet_info import _SUBSETS

    odd = next((n for n in names if not _WORDNET_ID.fullmatch(n)), None)
    if odd is not None:
        raise DataError(f"{root}: class folder {odd!r} is not an ImageNet WordNet id (like n01440764); give "
                        f"--class-map FILE {_CLASS_MAP_FORMAT} or a labels.csv")
    for subset in _SUBSETS:
        synsets = ImageNetInfo(subset).label_names()
        if len(synsets) == num_classes:
            return {name: i for i, name in enumerate(synsets)}
    raise DataError(f"{root}: the class folders are ImageNet WordNet ids, but the model has {num_classes} classes, "
                    f"no ImageNet variant's; give --class-map FILE {_CLASS_MAP_FORMAT}")


def class_description(index: int, num_classes: int) -> str:
    """A label index as words: the ImageNet class (timm's tables) for a head of an ImageNet
    variant's size, else ``class INDEX``."""
    from timm.data import ImageNetInfo
    from timm.data.imagenet_info import _SUBSETS

    subset = next((name for name in _SUBSETS if ImageNetInfo(name).num_classes() == num_classes), None)
    return ImageNetInfo(subset).index_to_description(index) if subset else f"class {index}"


def _read_class_map(path: Path) -> dict[str, int]:
    """timm's text class map: the class name on line i has label index i."""
    if path.suffix.lower() != ".txt" or not path.is_file():
        raise DataError(f"{path}: a class map is a .txt file {_CLASS_MAP_FORMAT}")
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not a text file ({exc})") from exc
    return {name: i for i, name in enumerate(names) if name}


def _check_in_label_space(labels: Iterable[int], num_classes: Optional[int], source: Any) -> None:
    """A :class:`DataError` when a label is not one of the model's ``num_classes`` (None: no check)."""
    if num_classes is None:
        return
    beyond = max(labels, default=-1)
    if beyond >= num_classes:
        raise DataError(f"{source}: class index {beyond} is beyond the model's {num_classes} classes")


def _relabel(dataset: Any, indices: dict[str, int]) -> None:
    """Give an ``ImageFolder``'s samples the model's label indices instead of its sorted folder order."""
    dataset.samples = [(path, indices[dataset.classes[c]]) for path, c in dataset.samples]
    dataset.imgs, dataset.targets = dataset.samples, [c for _, c in dataset.samples]
    dataset.class_to_idx = indices


def eval_transform(model: nn.Module) -> Callable:
    """The evaluation transform of ``model``'s data config: see :func:`input_transform`."""
    return input_transform(preprocessing_of(model))


def train_transform(model: nn.Module) -> Callable:
    """The training augmentation for ``model``'s data config: see :func:`input_transform`."""
    return input_transform(preprocessing_of(model), training=True)


class ProcessorTransform:
    """A transformers image processor as a transform: PIL image -> (3, H, W) tensor."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, image: Image.Image) -> Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


#: training augmentations by name: keyword arguments of timm's ``create_transform``
TRAINING_AUGMENTATIONS: dict[str, dict[str, Any]] = {
    # self-distillation on a small folder: the teacher sees the same crop, so light is enough
    "light": dict(scale=(0.35, 1.0), hflip=0.5, color_jitter=0.0, auto_augment=None, re_prob=0.0),
    # DeiT's recipe, which the IdleViT, EViT and DynamicViT training scripts keep (datasets.py
    # build_transform with main.py's defaults): RandAugment, random erasing, bicubic crops
    "deit": dict(scale=(0.08, 1.0), hflip=0.5, color_jitter=0.4, auto_augment="rand-m9-mstd0.5-inc1",
                 re_prob=0.25, re_mode="pixel", re_count=1, interpolation="bicubic"),
}


def augmentation_named(augment: Union[bool, str, None]) -> Optional[str]:
    """The training augmentation ``augment`` asks for: None (False, None), ``light`` (True), or the
    name it gives, checked against :data:`TRAINING_AUGMENTATIONS`."""
    if augment is None or augment is False:
        return None
    name = "light" if augment is True else augment
    if name not in TRAINING_AUGMENTATIONS:
        raise InvalidOptionError(f"unknown augmentation {name!r}: expected one of {', '.join(TRAINING_AUGMENTATIONS)}")
    return name


def input_transform(preprocessing: Preprocessing, training: bool = False, augmentation: str = "light") -> Callable:
    """PIL image -> (3, H, W) model input.

    Evaluation: a transformers checkpoint's own image processor where there is one, else timm's
    eval transform of the data config (resize, crop, normalise). Training: the named
    ``augmentation`` (:data:`TRAINING_AUGMENTATIONS`) built with timm's ``create_transform`` for
    the data config's size and normalisation: ``light`` is a random resized crop (scale 0.35-1)
    and a horizontal flip, no colour or erasing (with self-distillation the teacher sees the same
    augmented image, so no labels are needed and the student does not memorise a small folder);
    ``deit`` is the papers' recipe.
    """
    from timm.data import create_transform

    config = preprocessing.data_config
    if training:
        options = {"interpolation": config["interpolation"], **TRAINING_AUGMENTATIONS[augmentation_named(augmentation)]}
        return _with_zero_bit_posterize(create_transform(input_size=config["input_size"], is_training=True,
                                                         mean=config["mean"], std=config["std"], **options))
    if preprocessing.processor is not None:
        return ProcessorTransform(preprocessing.processor)
    return create_transform(**config)


def _posterize(image: Image.Image, bits: int, **_: Any) -> Image.Image:
    """Keep the ``bits`` most significant bits of each channel. RandAugment's ``PosterizeIncreasing``
    asks for 0 bits at its top magnitude, which ``rand-m9-mstd0.5`` reaches: a black image, as the
    TensorFlow reference and older Pillow give it (Pillow 13 raises ValueError instead)."""
    if bits >= 8:
        return image
    if bits <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits)


def _with_zero_bit_posterize(transform: Callable) -> Callable:
    """``transform`` with the posterize operations of its timm RandAugment replaced by
    :func:`_posterize`, so that no image fails the whole batch with Pillow's ValueError."""
    from timm.data.auto_augment import RandAugment

    for step in getattr(transform, "transforms", []):
        for op in step.ops if isinstance(step, RandAugment) else []:
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize
    return transform


def load_deit_tiny(root: PathLike, dynamic_img_size: bool = False) -> nn.Module:
    """The real DeiT-Tiny from the shared data directory, in eval mode (no download);
    ``dynamic_img_size``: taking any input size (timm resamples the position embeddings)."""
    import timm
    from safetensors.torch import load_file

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, dynamic_img_size=dynamic_img_size)
    model.load_state_dict(load_file(str(Path(root) / DEIT_TINY_WEIGHTS)), strict=True)
    return model.eval()


def load_images(dataset: Dataset, limit: Optional[int] = None, progress: bool = False) -> tuple[Tensor, Tensor]:
    """All (or the first ``limit``) items of ``dataset`` stacked: (M, 3, H, W) images, (M,) labels."""
    count = len(dataset) if limit is None else min(limit, len(dataset))
    with progress_bar(range(count), desc="images", show=progress, leave=False) as indices:  # erased on errors too
        images, labels = zip(*(dataset[i] for i in indices))
    return torch.stack(images), torch.tensor(labels)
