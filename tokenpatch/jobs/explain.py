"""The ``tokenpatch explain`` job: load images, explain a patched model on them, write PNGs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from PIL import Image
from torch import nn

from ..api import get_method_name, patch, set_options
from ..backends.build import build_model, load_checkpoint, timm_twin
from ..checkpoint import is_checkpoint, load
from ..core.registry import DEFAULT_METHOD
from ..data import eval_transform, normalisation
from ..errors import TokenPatchError
from ..interpret.explanation import explain
from ..interpret.render import contact_sheet, panel, to_pixels


def load_image_files(paths: Sequence[str], transform: Callable) -> torch.Tensor:
    """(B, 3, H, W) model inputs from image files, through ``transform`` (PIL image -> tensor)."""
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"no such image file: {', '.join(missing)}")
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])


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


def patched_model(model_spec: str, checkpoint: Optional[str], method: Optional[str], keep_ratio: Optional[float],
                  options: dict[str, Any]) -> nn.Module:
    """The model ``model_spec`` names, patched: from a ``tokenpatch.save`` checkpoint (its method and
    options, changed by any ``keep_ratio``/``options`` given), or plain weights patched with ``method``
    (default ``idle`` at 0.5)."""
    model = build_model(model_spec)
    if not (checkpoint and is_checkpoint(checkpoint)):
        if checkpoint:
            load_checkpoint(model, checkpoint)
        return patch(model, method or DEFAULT_METHOD, keep_ratio=keep_ratio or 0.5, **options)
    load(model, checkpoint)
    if method not in (None, get_method_name(model)):
        raise TokenPatchError(f"{checkpoint} holds a {get_method_name(model)!r} model; drop --method {method} "
                              f"or give plain weights")
    changes = {**options, **({} if keep_ratio is None else {"keep_ratio": keep_ratio})}
    if changes:
        set_options(model, **changes)
    return model
