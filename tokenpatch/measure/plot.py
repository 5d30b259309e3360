"""A small line chart in PIL (no matplotlib needed): one polyline with markers per series."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from PIL import Image, ImageDraw

# Distinguishable colours (Okabe-Ito, colour-blind safe) then greys.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000", "#777777"]
Point = tuple[float, float]


def _ticks(low: float, high: float, count: int = 6) -> list[float]:
    """Round tick values from at or below ``low`` to at or above ``high``."""
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw), default=magnitude * 10)
    ticks = [math.floor(low / step) * step]
    while ticks[-1] < high - step * 1e-9 or len(ticks) < 2:
        ticks.append(ticks[-1] + step)
    return [round(t, 10) for t in ticks]


def line_chart(series: Mapping[str, Sequence[Point]], title: str, x_label: str, y_label: str,
               size: tuple[int, int] = (900, 600)) -> Image.Image:
    """Chart of ``series`` (name -> (x, y) points, drawn in x order) with axes, ticks and a legend.

    Args:
        series: at least one non-empty series; a series of one point is drawn as a marker.
        size: (width, height) in pixels.
    """
    points = [p for values in series.values() for p in values]
    if not points:
        raise ValueError("line_chart needs at least one point")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_ticks, y_ticks = _ticks(min(xs), max(xs)), _ticks(min(ys), max(ys))
    width, height = size
    left, right, top, bottom = 70, 190, 40, 55
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)

    def at(x: float, y: float) -> tuple[float, float]:
        fx = (x - x_ticks[0]) / ((x_ticks[-1] - x_ticks[0]) or 1)
        fy = (y - y_ticks[0]) / ((y_ticks[-1] - y_ticks[0]) or 1)
        return left + fx * (width - left - right), height - bottom - fy * (height - top - bottom)

    for x in x_ticks:
        px, _ = at(x, y_ticks[0])
        draw.line([(px, top), (px, height - bottom)], fill="#e6e6e6")
        draw.text((px - 12, height - bottom + 6), f"{x:g}", fill="black")
    for y in y_ticks:
        _, py = at(x_ticks[0], y)
        draw.line([(left, py), (width - right, py)], fill="#e6e6e6")
        draw.text((left - 40, py - 6), f"{y:g}", fill="black")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text((left, 12), title, fill="black")
    draw.text(((left + width - right) / 2 - 60, height - 24), x_label, fill="black")
    draw.text((8, top - 24), y_label, fill="black")
    for i, (name, values) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        pixels = [at(x, y) for x, y in sorted(values)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=3)
        for px, py in pixels:
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour)
        legend_y = top + 8 + 18 * i
        draw.line([(width - right + 12, legend_y + 6), (width - right + 36, legend_y + 6)], fill=colour, width=3)
        draw.text((width - right + 42, legend_y), name, fill="black")
    return image
