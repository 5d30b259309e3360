"""Which of timm's pretrained models ``tokenpatch.patch`` accepts, measured on the meta device.

Each architecture is built once without weights on the meta device (no memory, no download)
and offered to :func:`~tokenpatch.backends.find_backend`; every pretrained tag of the
architecture shares its verdict.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..errors import UnsupportedModelError
from . import find_backend

#: timm's isotropic-transformer modules, the families tokenpatch aims to cover
ISOTROPIC_MODULES = ("vision_transformer", "deit", "eva", "beit", "vision_transformer_relpos", "naflexvit",
                     "vision_transformer_hybrid")


@dataclass
class Coverage:
    """Pretrained tags per timm module, how many are accepted, and why the others are refused.

    Attributes:
        tags: module -> pretrained tags in it.
        accepted: module -> tags ``patch`` accepts.
        refusals: first line of each refusal (its first 80 characters) -> tags refused with it.
    """

    tags: Counter = field(default_factory=Counter)
    accepted: Counter = field(default_factory=Counter)
    refusals: Counter = field(default_factory=Counter)

    @property
    def share(self) -> float:
        """Accepted tags over all tags."""
        return sum(self.accepted.values()) / max(1, sum(self.tags.values()))


def _verdict(architecture: str) -> str:
    """"" when ``patch`` would accept the architecture, else the first line of the refusal."""
    import timm

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = timm.create_model(architecture, pretrained=False)
    try:
        find_backend(model)
    except UnsupportedModelError as exc:
        return str(exc).splitlines()[0][:80]
    return ""


def timm_coverage(modules: tuple[str, ...] = ISOTROPIC_MODULES, progress: bool = True) -> Coverage:
    """Count the pretrained tags of timm ``modules`` whose architecture ``patch`` accepts."""
    import timm

    report, verdicts = Coverage(), {}
    tags = [(module, tag) for module in modules for tag in timm.list_models(module=module, pretrained=True)]
    for module, tag in tqdm(tags, desc="timm tags", disable=not progress, leave=False):
        architecture = tag.split(".")[0]
        if architecture not in verdicts:
            verdicts[architecture] = _verdict(architecture)
        report.tags[module] += 1
        if verdicts[architecture]:
            report.refusals[verdicts[architecture]] += 1
        else:
            report.accepted[module] += 1
    return report
