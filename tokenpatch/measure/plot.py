"""Figures of measured results with matplotlib (the ``plot`` extra: ``pip install 'tokenpatch[plot]'``;
nothing else in tokenpatch needs it)."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence, Union

from ..errors import TokenPatchError

#: one colour and marker per series: twelve distinguishable colours (tab10, then black and grey)
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#000000", "#aaaaaa"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "*"]


def _pyplot() -> Any:
    """matplotlib's pyplot on a file-only backend; a one-line error when the plot extra is missing."""
    try:
        import matplotlib
    except ImportError as exc:
        raise TokenPatchError("figures need matplotlib: pip install 'tokenpatch[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_figure(rows: Sequence[Mapping[str, Any]], unpatched_top1: float, title: str,
                  path: Union[str, os.PathLike]) -> None:
    """Top-1 against MACs (share of the unpatched model's) for each method, written to ``path`` (PNG).

    Every measured point is drawn and labelled with its top-1; a method is drawn only at the
    budgets it reached (rows with a ``note``, the unreachable ones, are left out), joined in MAC
    order to the unpatched model's point.

    Args:
        rows: result rows with ``method``, ``macs_ratio`` (0..1) and ``top1`` (%).
        unpatched_top1: the unpatched model's top-1 (%), drawn at 100 % of the MACs.
    """
    plt = _pyplot()
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if "note" not in row and row.get("top1") is not None:
            series.setdefault(row["method"], []).append((100 * row["macs_ratio"], row["top1"]))
    figure, (whole, zoom) = plt.subplots(1, 2, figsize=(14, 6.5), dpi=110, gridspec_kw={"width_ratios": [1, 1.4]})
    near = [y for points in series.values() for _, y in points if y >= unpatched_top1 - 8]
    for axes in (whole, zoom):
        axes.plot([100], [unpatched_top1], marker="*", markersize=14, color="black", linestyle="none",
                  label=f"unpatched ({unpatched_top1:.1f})", zorder=3)
        for i, (method, points) in enumerate(sorted(series.items())):
            _draw_series(axes, i, method, sorted(points), unpatched_top1, labels=axes is zoom or min(
                y for _, y in points) < unpatched_top1 - 8)
        axes.set_xlabel("MACs, % of the unpatched model's")
        axes.set_ylabel("top-1, %")
        axes.grid(True, alpha=0.3)
    if near:
        zoom.set_ylim(min(near) - 0.5, unpatched_top1 + 1.0)
    zoom.set_title("within 8 points of the unpatched model (every point labelled)", fontsize=10)
    whole.set_title("every method (points far below labelled here)", fontsize=10)
    whole.legend(fontsize=8, loc="lower right", ncol=2)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _draw_series(axes: Any, index: int, method: str, points: list[tuple[float, float]], unpatched_top1: float,
                 labels: bool) -> None:
    """One method's points, joined in MAC order to the unpatched point; each labelled with its
    top-1 when ``labels`` (to the right or left by turns, so that close points stay readable)."""
    colour, marker = COLOURS[index % len(COLOURS)], MARKERS[index % len(MARKERS)]
    xs, ys = zip(*(points + [(100.0, unpatched_top1)]))
    dashed = "untrained" in method or "=" in method  # a learned policy left untrained, or a non-default rule
    axes.plot(xs, ys, color=colour, marker=marker, markevery=list(range(len(points))), linewidth=1.2,
              linestyle="--" if dashed else "-", label=method)
    if labels:
        for x, y in points:
            axes.annotate(f"{y:.1f}", (x, y), textcoords="offset points", fontsize=7, color=colour,
                          xytext=(5, -3 + 4 * (index % 3)) if index % 2 == 0 else (-22, -3 + 4 * (index % 3)))
