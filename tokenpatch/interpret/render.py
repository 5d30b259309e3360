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


def merged(pixels: Tensor, groups: Tensor) -> Tensor:
    """(H, W, 3) pixels with each merged token shown as one colour (its patches' mean) and outlined;
    dropped patches greyed.

    Args:
        groups: (gh, gw) int64, patches with the same value were merged into one token; -1 for
            patches that were dropped (``ppt`` prunes some images).
    """
    gh, gw = groups.shape
    height, width = pixels.shape[:2]
    patch_colours = pixels[: height // gh * gh, : width // gw * gw].reshape(gh, height // gh, gw, width // gw, 3).mean(dim=(1, 3))
    ids = groups + 1  # 0 gathers the dropped patches
    flat = ids.flatten()
    sums = torch.zeros(int(flat.max()) + 1, 3).index_add_(0, flat, patch_colours.reshape(-1, 3))
    counts = torch.zeros(int(flat.max()) + 1).index_add_(0, flat, torch.ones(len(flat)))
    out = greyed(_upsample((sums / counts.clamp_min(1).unsqueeze(-1))[ids], height, width), groups >= 0)
    cell = _upsample(ids, height, width)
    edge = torch.zeros(height, width, dtype=torch.bool)
    edge[:, 1:] |= cell[:, 1:] != cell[:, :-1]
    edge[1:, :] |= cell[1:, :] != cell[:-1, :]
    return torch.where(edge.unsqueeze(-1), torch.zeros(3), out)


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


def panel(pixels: Tensor, explanation: Explanation, index: int, max_stages: int = 4,
          caption: str = "input") -> Image.Image:
    """One image's row: the input (under ``caption``, e.g. the predicted class), the patches each
    stage computed (others greyed), the scores and a colour bar for them.

    Args:
        pixels: (H, W, 3) RGB of image ``index`` of the explained batch (see :func:`to_pixels`).
        max_stages: at most this many stages (the blocks where the computed set changes) are shown.
    """
    tiles = [_labelled(pixels, caption)]
    if explanation.groups is not None:
        return _row(tiles + _merge_tiles(pixels, explanation.groups[index], max_stages))
    computed = explanation.computed[index]
    reducing = [b for b in explanation.stage_blocks() if not computed[b].all()]
    for block in reducing[:max_stages]:
        kept = int(computed[block].sum())
        tiles.append(_labelled(greyed(pixels, computed[block]), f"block {block}: {kept}/{computed[block].numel()}"))
    scored = sorted(explanation.scores.items())
    for block, values in scored[:: max(1, -(-len(scored) // max_stages))]:  # at most max_stages, spread out
        tiles.append(_labelled(heatmap(pixels, values[index]), f"{explanation.score_name} @{block}"))
    tiles.append(_labelled(heatmap(pixels, explanation.importance()[index]), "importance"))
    return _row(tiles + [colour_bar(pixels.shape[0])])


def colour_bar(height: int, width: int = 14) -> Image.Image:
    """The maps' colour scale, high at the top: each map spans it from its own lowest to its highest score."""
    ramp = colour(torch.linspace(1.0, 0.0, height).unsqueeze(1).expand(height, width).contiguous())
    tile = Image.new("RGB", (width + 34, height + LABEL_HEIGHT), "white")
    tile.paste(Image.fromarray(ramp.round().to(torch.uint8).numpy()), (0, LABEL_HEIGHT))
    draw = ImageDraw.Draw(tile)
    draw.text((width + 3, LABEL_HEIGHT), "high", fill="black")
    draw.text((width + 3, LABEL_HEIGHT + height - 11), "low", fill="black")
    draw.text((0, 1), "scale", fill="black")
    return tile


def _merge_tiles(pixels: Tensor, groups: Tensor, max_stages: int) -> list[Image.Image]:
    """Tiles of one image's (depth, gh, gw) merge groups at up to ``max_stages`` evenly spread blocks."""
    depth = groups.shape[0]
    blocks = sorted({depth - 1 - i * depth // max_stages for i in range(max_stages)})
    return [_labelled(merged(pixels, groups[b]), f"block {b}: {int((groups[b].unique() >= 0).sum())} tokens")
            for b in blocks]


def contact_sheet(panels: Sequence[Image.Image], gap: int = 6) -> Image.Image:
    """Panels stacked top to bottom on a white sheet."""
    width = max(p.width for p in panels)
    sheet = Image.new("RGB", (width, sum(p.height for p in panels) + gap * (len(panels) - 1)), "white")
    y = 0
    for p in panels:
        sheet.paste(p, (0, y))
        y += p.height + gap
    return sheet
