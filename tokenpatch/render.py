"""Pictures of an :class:`~tokenpatch.explain.Explanation`: overlays, heatmaps and a contact sheet (PIL only)."""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from .explanation import Explanation

# A perceptually ordered dark-blue -> teal -> yellow ramp (anchor colours of a viridis-like map).
RAMP = torch.tensor([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=torch.float32)
MISSING = torch.tensor([40, 40, 40], dtype=torch.float32)  # patches with no score
GREY = torch.tensor([128, 128, 128], dtype=torch.float32)
LABEL_HEIGHT = 14


def to_pixels(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """A normalised (3, H, W) image back to (H, W, 3) float RGB in [0, 255]."""
    pixels = image.detach().float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return (pixels.clamp(0, 1) * 255).permute(1, 2, 0)


def _upsample(grid: Tensor, height: int, width: int) -> Tensor:
    """(gh, gw, ...) per-patch values -> (H, W, ...), each patch a block of pixels."""
    rows = torch.arange(height) * grid.shape[0] // height
    cols = torch.arange(width) * grid.shape[1] // width
    return grid[rows][:, cols]


def colour(values: Tensor) -> Tensor:
    """(gh, gw) values (NaN: missing) -> (gh, gw, 3) RGB, scaled to the map's own min..max."""
    present = ~values.isnan()
    low, high = (values[present].min(), values[present].max()) if present.any() else (0.0, 1.0)
    t = ((values - low) / max(float(high - low), 1e-12)).nan_to_num(0.0).clamp(0, 1) * (len(RAMP) - 1)
    left = t.floor().long().clamp(max=len(RAMP) - 2)
    frac = (t - left).unsqueeze(-1)
    rgb = RAMP[left] * (1 - frac) + RAMP[left + 1] * frac
    return torch.where(present.unsqueeze(-1), rgb, MISSING)


def greyed(pixels: Tensor, kept: Tensor) -> Tensor:
    """(H, W, 3) pixels with the patches not in ``kept`` (gh, gw bool) washed out to grey."""
    mask = _upsample(kept, *pixels.shape[:2]).unsqueeze(-1)
    return torch.where(mask, pixels, 0.25 * pixels + 0.75 * GREY)


def heatmap(pixels: Tensor, values: Tensor) -> Tensor:
    """(H, W, 3) pixels under a half-transparent colour map of (gh, gw) ``values``."""
    rgb = colour(values)
    return 0.4 * pixels + 0.6 * _upsample(rgb, *pixels.shape[:2])


def _labelled(pixels: Tensor, label: str) -> Image.Image:
    tile = Image.new("RGB", (pixels.shape[1], pixels.shape[0] + LABEL_HEIGHT), "white")
    tile.paste(Image.fromarray(pixels.round().to(torch.uint8).numpy()), (0, LABEL_HEIGHT))
    ImageDraw.Draw(tile).text((2, 1), label, fill="black")
    return tile


def _row(tiles: list[Image.Image], gap: int = 4) -> Image.Image:
    width = sum(t.width for t in tiles) + gap * (len(tiles) - 1)
    row = Image.new("RGB", (width, max(t.height for t in tiles)), "white")
    x = 0
    for tile in tiles:
        row.paste(tile, (x, 0))
        x += tile.width + gap
    return row


def panel(pixels: Tensor, explanation: Explanation, index: int, max_stages: int = 4) -> Image.Image:
    """One image's row: the input, the patches each stage computed (others greyed), the scores.

    Args:
        pixels: (H, W, 3) RGB of image ``index`` of the explained batch (see :func:`to_pixels`).
        max_stages: at most this many stages (the blocks where the computed set changes) are shown.
    """
    tiles = [_labelled(pixels, "input")]
    computed = explanation.computed[index]
    reducing = [b for b in explanation.stage_blocks() if not computed[b].all()]
    for block in reducing[:max_stages]:
        kept = int(computed[block].sum())
        tiles.append(_labelled(greyed(pixels, computed[block]), f"block {block}: {kept}/{computed[block].numel()}"))
    scored = sorted(explanation.scores.items())
    for block, values in scored[:: max(1, -(-len(scored) // max_stages))]:  # at most max_stages, spread out
        tiles.append(_labelled(heatmap(pixels, values[index]), f"{explanation.score_name} @{block}"))
    tiles.append(_labelled(heatmap(pixels, explanation.importance()[index]), "importance"))
    return _row(tiles)


def contact_sheet(panels: Sequence[Image.Image], gap: int = 6) -> Image.Image:
    """Panels stacked top to bottom on a white sheet."""
    width = max(p.width for p in panels)
    sheet = Image.new("RGB", (width, sum(p.height for p in panels) + gap * (len(panels) - 1)), "white")
    y = 0
    for p in panels:
        sheet.paste(p, (0, y))
        y += p.height + gap
    return sheet
