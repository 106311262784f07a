"""Figures of the representation analyses, as PNG bytes (the numbers are docs/methods.md's and
section 1's memories and perturbations; see docs/analyses.md for which figure shows what).

matplotlib's object API on the Agg canvas: no pyplot, no display, no global state, so
figures can be drawn from worker threads. Every function returns the PNG bytes of one
figure and closes nothing it did not open.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

DPI = 110
_MARKERS = "osD^v<>px*"


def to_png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def _values(values: Sequence[float | None] | npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Floats with ``None`` (a missing value in JSON) as NaN."""
    if isinstance(values, Sequence) and not isinstance(values, str):
        return np.array([math.nan if v is None else v for v in values], dtype=np.float64)
    return np.asarray(values, dtype=np.float64)


def _tick_labels(axes: Axes, names: Sequence[str], axis: str, limit: int = 40) -> None:
    """All names when they fit, else every k-th."""
    step = max(1, math.ceil(len(names) / limit))
    positions = list(range(0, len(names), step))
    labels = [names[i] for i in positions]
    if axis == "x":
        axes.set_xticks(positions, labels, rotation=60 if max(map(len, labels), default=0) > 3 else 0, ha="right")
    else:
        axes.set_yticks(positions, labels)


def heatmap(
    matrix: npt.ArrayLike,
    rows: Sequence[str],
    columns: Sequence[str],
    *,
    title: str,
    row_label: str,
    column_label: str,
    colour_label: str = "CKA",
    limits: tuple[float, float] = (0.0, 1.0),
) -> bytes:
    """A matrix with labelled rows and columns and a colour bar (CKA: rows and columns are layers)."""
    values = np.asarray(matrix, dtype=np.float64)
    size = (max(4.5, 0.32 * len(columns) + 2.5), max(3.8, 0.3 * len(rows) + 1.8))
    figure = Figure(figsize=size)
    axes = figure.add_subplot()
    image = axes.imshow(values, cmap="magma", vmin=limits[0], vmax=limits[1], origin="lower", aspect="auto")
    _tick_labels(axes, columns, "x")
    _tick_labels(axes, rows, "y")
    axes.set_xlabel(column_label)
    axes.set_ylabel(row_label)
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label=colour_label)
    return to_png(figure)


def head_scatter(
    series: Mapping[str, npt.ArrayLike], *, title: str, ylabel: str = "mean attention distance (px)"
) -> bytes:
    """Per-head values ``[L, H]`` against the block, one colour per series (model)."""
    figure = Figure(figsize=(6.0, 4.0))
    axes = figure.add_subplot()
    count = len(series)
    depth = 0
    for index, (label, values) in enumerate(series.items()):
        matrix = np.asarray(values, dtype=np.float64)
        depth = max(depth, matrix.shape[0])
        offset = (index - (count - 1) / 2) * 0.12
        blocks = np.repeat(np.arange(1, matrix.shape[0] + 1), matrix.shape[1]) + offset
        axes.scatter(blocks, matrix.flatten(), s=18, alpha=0.75, marker=_MARKERS[index % len(_MARKERS)], label=label)
    axes.set_xticks(range(1, depth + 1))
    axes.set_xlabel("block")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if count:
        axes.legend(fontsize="small")
    return to_png(figure)


def layer_curves(
    layers: Sequence[str],
    curves: Mapping[str, Sequence[float | None] | npt.ArrayLike],
    *,
    title: str,
    ylabel: str,
    limits: tuple[float, float] | None = None,
    reference: tuple[float, str] | None = None,
) -> bytes:
    """One line per curve over the layers; ``reference`` is a horizontal line (value, label), e.g. chance."""
    figure = Figure(figsize=(max(5.5, 0.35 * len(layers) + 2.5), 4.0))
    axes = figure.add_subplot()
    x = np.arange(len(layers))
    for index, (label, values) in enumerate(curves.items()):
        axes.plot(x, _values(values), marker=_MARKERS[index % len(_MARKERS)], label=label)
    if reference is not None:
        axes.axhline(reference[0], color="grey", linestyle="--", linewidth=1, label=reference[1])
    _tick_labels(axes, layers, "x")
    axes.set_xlabel("layer")
    axes.set_ylabel(ylabel)
    if limits is not None:
        axes.set_ylim(*limits)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return to_png(figure)


def localisation_grid(maps: npt.ArrayLike, grid: tuple[int, int], *, title: str) -> bytes:
    """An ``h x w`` grid of small maps: at token ``j``'s place, its CKA with the input patch at every position.

    One colour scale for all maps; a white square marks each token's own position.
    """
    values = np.asarray(maps, dtype=np.float64)
    h, w = grid
    figure = Figure(figsize=(min(14.0, 1.1 * w + 1.5), min(14.0, 1.1 * h + 1.0)))
    axes_grid = figure.subplots(h, w, squeeze=False)
    finite = values[np.isfinite(values)]
    top = float(finite.max()) if finite.size else 1.0
    image = None
    for j in range(h * w):
        axes = axes_grid[j // w][j % w]
        image = axes.imshow(values[j], cmap="viridis", vmin=0.0, vmax=max(top, 1e-6), interpolation="nearest")
        axes.add_patch(_own_position(j // w, j % w))
        axes.set_xticks([])
        axes.set_yticks([])
    figure.suptitle(title)
    if image is not None:
        figure.colorbar(image, ax=axes_grid, shrink=0.6, label="CKA (input patch, final token)")
    return to_png(figure)


def _own_position(row: int, column: int) -> Rectangle:
    return Rectangle((column - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="white", linewidth=1.2)


def map_grid(
    maps: npt.ArrayLike,
    titles: Sequence[str],
    *,
    title: str,
    colour_label: str,
    columns: int = 6,
    centred: bool = True,
) -> bytes:
    """``K`` maps of ``h x w`` side by side, ``columns`` to a row, on one colour scale.

    ``centred``: a diverging scale symmetric about 0 (signed relevance: red promotes, blue
    opposes); otherwise viridis over the maps' range.
    """
    values = np.asarray(maps, dtype=np.float64)
    count = values.shape[0]
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(1.9 * columns + 1.2, 1.9 * rows + 0.8))
    axes_grid = figure.subplots(rows, columns, squeeze=False)
    finite = values[np.isfinite(values)]
    if centred:
        top = float(np.abs(finite).max()) if finite.size else 1.0
        limits, colours = (-max(top, 1e-12), max(top, 1e-12)), "RdBu_r"
    else:
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        limits, colours = (low, max(high, low + 1e-12)), "viridis"
    image = None
    for index, axes in enumerate(axes_grid.flat):
        axes.set_xticks([])
        axes.set_yticks([])
        if index >= count:
            axes.set_axis_off()
            continue
        image = axes.imshow(values[index], cmap=colours, vmin=limits[0], vmax=limits[1], interpolation="nearest")
        axes.set_title(titles[index], fontsize="small")
    figure.suptitle(title)
    if image is not None:
        figure.colorbar(image, ax=axes_grid, shrink=0.7, label=colour_label)
    return to_png(figure)


def removal_curves(
    fractions: Sequence[float], curves: Mapping[str, Sequence[float | None]], *, title: str, ylabel: str
) -> bytes:
    """Token-removal curves: one line per curve against the share of image tokens removed."""
    figure = Figure(figsize=(6.0, 4.0))
    axes = figure.add_subplot()
    x = 100 * np.asarray(fractions, dtype=np.float64)
    for index, (label, values) in enumerate(curves.items()):
        style = "--" if label.startswith("negative") else "-"
        axes.plot(x, _values(values), style, marker=_MARKERS[index % len(_MARKERS)], label=label)
    axes.set_xlabel("image tokens removed (%)")
    axes.set_ylabel(ylabel)
    axes.set_ylim(0.0, 1.02)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return to_png(figure)


def marked_panels(
    panels: Sequence[tuple[str, Sequence[str], Mapping[str, Sequence[float | None]], Sequence[bool]]],
    *,
    title: str,
    ylabel: str,
    mark_label: str,
) -> bytes:
    """Panels of curves over layers side by side, ``(title, layers, curves, marked)`` each; marked layers starred.

    A star sits above the highest curve at every layer whose ``marked`` is true (e.g. a
    significant difference between the curves).
    """
    figure = Figure(figsize=(6.0 * len(panels), 4.2))
    axes_row = figure.subplots(1, len(panels), squeeze=False)[0]
    for axes, (name, layers, curves, marked) in zip(axes_row, panels, strict=True):
        x = np.arange(len(layers))
        top = np.full(len(layers), -np.inf)
        for index, (label, values) in enumerate(curves.items()):
            series = _values(values)
            top = np.fmax(top, series)
            axes.plot(x, series, marker=_MARKERS[index % len(_MARKERS)], label=label)
        where = np.flatnonzero(np.asarray(marked, dtype=bool) & np.isfinite(top))
        if where.size:
            axes.scatter(where, top[where] + 0.04, marker="*", s=90, color="black", label=mark_label, zorder=3)
        _tick_labels(axes, layers, "x")
        axes.set_xlabel("layer")
        axes.set_ylabel(ylabel)
        axes.set_ylim(0.0, 1.1)
        axes.set_title(name)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    figure.suptitle(title)
    return to_png(figure)
