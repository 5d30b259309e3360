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
    labelled: dict[Any, list[tuple[float, float, str]]] = {whole: [], zoom: []}
    for axes in (whole, zoom):
        axes.plot([100], [unpatched_top1], marker="*", markersize=14, color="black", linestyle="none",
                  label=f"unpatched ({unpatched_top1:.1f})", zorder=3)
        for i, (method, points) in enumerate(sorted(series.items())):
            colour = _draw_series(axes, i, method, sorted(points), unpatched_top1)
            labelled[axes] += [(x, y, colour) for x, y in points if axes is zoom or y < unpatched_top1 - 8]
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
    for axes, points in labelled.items():  # after the layout: the spacing is in the final display units
        _label_points(axes, points, figure.dpi)
    figure.savefig(path)
    plt.close(figure)


def _draw_series(axes: Any, index: int, method: str, points: list[tuple[float, float]],
                 unpatched_top1: float) -> str:
    """One method's points, joined in MAC order to the unpatched point; returns its colour."""
    colour, marker = COLOURS[index % len(COLOURS)], MARKERS[index % len(MARKERS)]
    xs, ys = zip(*(points + [(100.0, unpatched_top1)]))
    dashed = "untrained" in method or "=" in method  # a learned policy left untrained, or a non-default rule
    axes.plot(xs, ys, color=colour, marker=marker, markevery=list(range(len(points))), linewidth=1.2,
              linestyle="--" if dashed else "-", label=method)
    return colour


def _label_points(axes: Any, points: list[tuple[float, float, str]], dpi: float, spacing: float = 9.0,
                  budget_width: float = 5.0, gap: float = 7.0) -> None:
    """Label each (MACs %, top-1, colour) point with its top-1 so that no two labels overlap and none
    covers a marker: the points of one budget (MACs within ``budget_width``) are labelled right and
    left of the whole group by turns in top-1 order, ``gap`` typographic points clear of it, labels on
    one side pushed apart to ``spacing`` points, each joined to its point by a thin line when moved."""
    low, high = axes.get_ylim()
    budgets: dict[int, list[tuple[float, float, str]]] = {}
    for point in points:
        if low <= point[1] <= high:  # a label of a point outside the zoomed band would float alone
            budgets.setdefault(round(point[0] / budget_width), []).append(point)
    to_points = 72.0 / dpi  # display pixels to typographic points
    for group in budgets.values():
        group.sort(key=lambda p: p[1])
        shown = [(axes.transData.transform((x, y)) * to_points, (x, y), colour) for x, y, colour in group]
        edges = {1: max(at[0] for at, _, _ in shown) + gap, -1: min(at[0] for at, _, _ in shown) - gap}
        for side in (1, -1):
            placed = -float("inf")
            for (across, up), (x, y), colour in shown[(0 if side == 1 else 1)::2]:
                placed = max(up, placed + spacing)
                moved = (edges[side] - across, placed - up)
                axes.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(moved[0], moved[1] - 3),
                              fontsize=7, color=colour, ha="left" if side == 1 else "right",
                              arrowprops=dict(arrowstyle="-", color=colour, linewidth=0.5, shrinkA=0, shrinkB=3))
