"""The ``tokenpatch explain`` job: load images, explain a patched model on them, write PNGs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..backends.build import timm_twin
from ..data import eval_transform, normalisation, read_image
from ..interpret.explanation import explain
from ..interpret.render import contact_sheet, panel, to_pixels


def load_image_files(paths: Sequence[str], transform: Callable) -> torch.Tensor:
    """(B, 3, H, W) model inputs from image files, through ``transform`` (PIL image -> tensor)."""
    return torch.stack([transform(read_image(p)) for p in paths])


def write_explanations(model: nn.Module, paths: Sequence[str], model_spec: str, out: str) -> dict[str, Any]:
    """Explain the patched ``model`` on the image files and write one PNG per image plus a contact sheet.

    Returns:
        What was written and, per image, the patches each block computed (for a merging
        method, the tokens: each merged token counts once); ``merged`` says whether tokens merged.
    """
    reference = timm_twin(model_spec)
    images = load_image_files(paths, eval_transform(reference))
    explanation = explain(model, images)
    mean, std = normalisation(reference)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    panels, written, computed = [], [], []
    for i, path in enumerate(paths):
        picture = panel(to_pixels(images[i], mean, std), explanation, i)
        target = folder / f"{i:03d}_{Path(path).stem}.png"
        picture.save(target)
        panels.append(picture)
        written.append(str(target))
        computed.append(explanation.computed[i].flatten(1).sum(dim=1).tolist())
    sheet = folder / "contact_sheet.png"
    contact_sheet(panels).save(sheet)
    return {"images": list(paths), "files": written, "contact_sheet": str(sheet), "grid": list(explanation.grid),
            "patches_per_block": computed, "score_name": explanation.score_name,
            "merged": explanation.groups is not None}
