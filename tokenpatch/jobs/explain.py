"""The ``tokenpatch explain`` job: load images, explain a patched model on them, write PNGs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..backends.build import Preprocessing
from ..data import class_description, input_transform, read_image
from ..errors import TokenPatchError
from ..interpret.explanation import explain
from ..interpret.render import contact_sheet, panel, to_pixels
from ..measure.runtime import Runtime


def load_image_files(paths: Sequence[str], transform: Callable) -> torch.Tensor:
    """(B, 3, H, W) model inputs from image files, through ``transform`` (PIL image -> tensor)."""
    return torch.stack([transform(read_image(p)) for p in paths])


def write_explanations(model: nn.Module, paths: Sequence[str], preprocessing: Preprocessing, out: str,
                       runtime: Runtime = Runtime()) -> dict[str, Any]:
    """Explain the patched ``model`` on the image files, prepared as ``preprocessing`` says and run
    on ``runtime``'s device (under its autocast), and write one PNG per image plus a contact sheet.

    Returns:
        What was written and, per image, the patches each block computed (for a merging
        method, the tokens: each merged token counts once); ``merged`` says whether tokens merged.
    """
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise TokenPatchError(f"--out {out} is a file: give a folder for the overlays")
    images = load_image_files(paths, input_transform(preprocessing))
    with runtime.autocast():
        explanation = explain(runtime.place(model), runtime.inputs(images)).to_cpu()
    predictions = _predictions(explanation.logits)
    mean, std = preprocessing.data_config["mean"], preprocessing.data_config["std"]
    folder.mkdir(parents=True, exist_ok=True)
    panels, written, computed = [], [], []
    for i, path in enumerate(paths):
        caption = f"{predictions[i][1].split(',')[0]} ({predictions[i][2]:.0%})" if predictions else "input"
        picture = panel(to_pixels(images[i], mean, std), explanation, i, caption=caption)
        target = folder / f"{i:03d}_{Path(path).stem}.png"
        picture.save(target)
        panels.append(picture)
        written.append(str(target))
        computed.append(explanation.computed[i].flatten(1).sum(dim=1).tolist())
    sheet = folder / "contact_sheet.png"
    contact_sheet(panels).save(sheet)
    return {"images": list(paths), "files": written, "contact_sheet": str(sheet), "grid": list(explanation.grid),
            "patches_per_block": computed, "score_name": explanation.score_name,
            "merged": explanation.groups is not None,
            "predicted": [{"class_index": c, "class": name, "probability": p} for c, name, p in predictions]}


def _predictions(logits: Optional[torch.Tensor]) -> list[tuple[int, str, float]]:
    """(class index, its words, probability) of the top class of each row of (B, classes) ``logits``;
    none for a model without a classifier head (None)."""
    if logits is None:
        return []
    top, index = logits.softmax(dim=-1).max(dim=-1)
    return [(int(c), class_description(int(c), logits.shape[-1]), float(p)) for c, p in zip(index, top)]
