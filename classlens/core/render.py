"""Render relevance maps as PNG images for people to look at.

A relevance map from a Vision Transformer is a small ``h x w`` grid, one value per image patch. A grid of
numbers means little on its own: people judge an explanation by seeing *where* on their own image the
relevance lies, so every map is drawn over the image it explains, with crisp square patches (nearest
neighbour, no smoothing that would suggest detail the model never had) and a colour bar that gives the values.

When several maps are shown together (one per layer, say) they share ONE colour scale and one legend:
with a scale per map every layer would look equally confident, and layers could not be compared.

The image under a map is the model's input (after the manifest's resize and crop), not the upload: the
grid covers only what the network saw. Given the manifest's preprocessing steps, a caption under the
figure says so, so that nobody reads a cropped-away border as "no relevance there".

Torch-free (numpy and Pillow only), so the API process can render too. The colour maps are 256-entry lookup
tables interpolated between anchor colours of matplotlib's maps; matplotlib itself is not needed.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:  # attributes only: this module needs numpy and Pillow alone at run time
    from model_store.manifest import Preprocessing

__all__ = [
    "COLORMAPS",
    "DEFAULT_ALPHA",
    "DEFAULT_COLORMAP",
    "DIVERGING_COLORMAPS",
    "MIN_SIDE",
    "NAN_COLOR",
    "colorize",
    "input_caption",
    "render_grid",
    "render_overlay",
    "resolve_limits",
    "to_png_bytes",
]

# Anchor colours, evenly spaced from the low end (first) to the high end (last) of each map.
# inferno and viridis: matplotlib's maps sampled at 10 evenly spaced points.
_INFERNO = "#000004 #1b0c42 #4b0c6b #781c6d #a52c60 #cf4446 #ed6925 #fb9a06 #f7d03c #fcffa4"
_VIRIDIS = "#440154 #482878 #3e4a89 #31688e #26828e #1f9e89 #35b779 #6dcd59 #b4de2c #fde725"
# RdBu: the 11 ColorBrewer colours matplotlib's RdBu is built from (red for low values, blue for high ones).
_RDBU = "#67001f #b2182b #d6604d #f4a582 #fddbc7 #f7f7f7 #d1e5f0 #92c5de #4393c3 #2166ac #053061"

DEFAULT_COLORMAP = "inferno"
# Maps centred on zero: by default their scale is symmetric, -max|v| .. +max|v|, so that 0 is the neutral colour.
DIVERGING_COLORMAPS = frozenset({"RdBu", "RdBu_r"})
NAN_COLOR = (128, 128, 128)
# Weight of the colours over the image: the image stays visible under the map.
DEFAULT_ALPHA = 0.55
# The shorter side of a rendered overlay is enlarged (by an integer factor) to at least this many pixels.
MIN_SIDE = 224

_BACKGROUND = (255, 255, 255)
_TEXT = (25, 25, 25)
_PAD = 6
_BAR_WIDTH = 14
_LABEL_GAP = 6
_FONT_SIZE = 13
_CAPTION_FONT_SIZE = 11

_Font: TypeAlias = ImageFont.ImageFont | ImageFont.FreeTypeFont | ImageFont.TransposedFont


def _lookup_table(anchors: str) -> npt.NDArray[np.uint8]:
    """A read-only ``[256, 3]`` uint8 table, linearly interpolated between evenly spaced anchor colours.

    ``anchors``: "#rrggbb" colours separated by spaces, from the low end to the high end.
    """
    colours = anchors.split()
    rgb = np.array([[int(colour[i : i + 2], 16) for i in (1, 3, 5)] for colour in colours], dtype=np.float64)
    positions = np.linspace(0.0, 1.0, len(colours))
    steps = np.linspace(0.0, 1.0, 256)
    table = np.stack([np.interp(steps, positions, rgb[:, channel]) for channel in range(3)], axis=1)
    lut = np.rint(table).astype(np.uint8)
    lut.setflags(write=False)
    return lut


COLORMAPS: Mapping[str, npt.NDArray[np.uint8]] = MappingProxyType(
    {
        "inferno": _lookup_table(_INFERNO),
        "viridis": _lookup_table(_VIRIDIS),
        "RdBu": _lookup_table(_RDBU),
        "RdBu_r": _lookup_table(" ".join(reversed(_RDBU.split()))),
    }
)


def _lut(colormap: str) -> npt.NDArray[np.uint8]:
    try:
        return COLORMAPS[colormap]
    except KeyError:
        known = ", ".join(sorted(COLORMAPS))
        raise ValueError(f"unknown colormap {colormap!r}; known colormaps: {known}") from None


def resolve_limits(
    values: npt.ArrayLike | Sequence[npt.ArrayLike],
    vmin: float | None = None,
    vmax: float | None = None,
    colormap: str = DEFAULT_COLORMAP,
) -> tuple[float, float]:
    """The ``(vmin, vmax)`` a colour scale uses: the given limits, else the finite min/max of ``values``.

    ``values`` may be one array or a list of arrays of any shapes (the maps of a grid). For a diverging
    colormap with neither limit given the scale is symmetric around zero. With no finite values at all the
    missing limits default to 0.
    """
    _lut(colormap)
    if isinstance(values, list | tuple):
        parts = [np.asarray(part, dtype=np.float64).ravel() for part in values]
        flat = np.concatenate(parts) if parts else np.zeros(0)
    else:
        flat = np.asarray(values, dtype=np.float64).ravel()
    for name, limit in (("vmin", vmin), ("vmax", vmax)):
        if limit is not None and not math.isfinite(limit):
            raise ValueError(f"{name} must be finite, got {limit!r}")
    finite = flat[np.isfinite(flat)]
    if vmin is None and vmax is None and colormap in DIVERGING_COLORMAPS:
        bound = float(np.abs(finite).max()) if finite.size else 0.0
        return -bound, bound
    data_lo, data_hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if vmin is not None and vmax is not None:
        if vmin > vmax:
            raise ValueError(f"vmin ({vmin}) must not exceed vmax ({vmax})")
        return float(vmin), float(vmax)
    if vmin is not None:
        return float(vmin), max(float(vmin), data_hi)
    if vmax is not None:
        return min(data_lo, float(vmax)), float(vmax)
    return data_lo, data_hi


def colorize(
    values: np.ndarray,
    vmin: float | None = None,
    vmax: float | None = None,
    colormap: str = DEFAULT_COLORMAP,
) -> npt.NDArray[np.uint8]:
    """Map values to RGB colours: ``[h, w]`` in, ``[h, w, 3]`` uint8 out (any shape works the same way).

    Values are clipped to ``[vmin, vmax]`` (defaults: see :func:`resolve_limits`); vmin gets the first colour
    of the table, vmax the last. NaN becomes grey (:data:`NAN_COLOR`), +inf/-inf the top/bottom colour.
    When vmin == vmax (a constant map) values equal to it get the middle colour.
    """
    lut = _lut(colormap)
    data = np.asarray(values, dtype=np.float64)
    lo, hi = resolve_limits(data, vmin, vmax, colormap)
    nan = np.isnan(data)
    filled = np.where(nan, lo, data)
    span = hi - lo
    if span > 0:
        with np.errstate(over="ignore", invalid="ignore"):
            scaled = np.clip((filled - lo) / span, 0.0, 1.0)
    else:
        scaled = np.where(filled > hi, 1.0, np.where(filled < lo, 0.0, 0.5))
    out = lut[np.rint(scaled * 255).astype(np.intp)]
    out[nan] = NAN_COLOR
    return out


def _format_value(value: float) -> str:
    text = f"{value:.3g}"
    return "0" if text == "-0" else text


def _font(size: int = _FONT_SIZE) -> _Font:
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):  # Pillow without FreeType: the fixed-size bitmap font
        return ImageFont.load_default()


def _line_height(font: _Font) -> int:
    return int(font.getbbox("Ág|y")[3]) + 3


def _text_width(font: _Font, text: str) -> int:
    return math.ceil(font.getlength(text))


def _wrap(text: str, font: _Font, max_width: int) -> list[str]:
    """Greedy word wrap; a word wider than the line is broken between characters."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if _text_width(font, candidate) <= max_width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for char in word:
                if line and _text_width(font, line + char) > max_width:
                    lines.append(line)
                    line = ""
                line += char
        lines.append(line)
    return lines


def _text_block(text: str, width: int, font: _Font) -> Image.Image | None:
    """Centred, wrapped text on a white strip ``width`` pixels wide; None for an empty text."""
    if not text.strip():
        return None
    lines = _wrap(text.strip(), font, max(width - 2 * _PAD, 1))
    line_height = _line_height(font)
    strip = Image.new("RGB", (width, len(lines) * line_height + 2 * _PAD), _BACKGROUND)
    draw = ImageDraw.Draw(strip)
    for number, line in enumerate(lines):
        x = max((width - _text_width(font, line)) // 2, 0)
        draw.text((x, _PAD + number * line_height), line, font=font, fill=_TEXT)
    return strip


def input_caption(image: Image.Image, preprocessing: Preprocessing) -> str:
    """What the picture under the maps is: the model's input, after which of the manifest's steps.

    ``image`` must be that input (``classlens.core.images.fit_to_input``): a caption that named a
    size the picture does not have would mislead, so a mismatch is a ``ValueError``.
    """
    height, width = preprocessing.output_size
    if image.size != (width, height):
        raise ValueError(
            f"the image is {image.width}x{image.height} but the preprocessing ends at {width}x{height}: "
            "draw the maps over the image as the model saw it (fit_to_input)"
        )
    steps = ["border trim"] if preprocessing.trim_border else []
    steps.append("resize")
    if preprocessing.crop is not None:
        steps.append("crop")
    done = steps[0] if len(steps) == 1 else ", ".join(steps[:-1]) + " and " + steps[-1]
    return f"drawn over the model's {width}x{height} input (after {done})"


def _caption_block(image: Image.Image, preprocessing: Preprocessing | None, width: int) -> Image.Image | None:
    if preprocessing is None:
        return None
    return _text_block(input_caption(image, preprocessing), width, _font(_CAPTION_FONT_SIZE))


def _scale_for(size: tuple[int, int], scale: int | None) -> int:
    if scale is None:
        return max(1, math.ceil(MIN_SIDE / min(size)))
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    return int(scale)


def _overlay(image: Image.Image, colours: npt.NDArray[np.uint8], alpha: float, scale: int) -> Image.Image:
    """The ``[h, w, 3]`` patch colours blended over the RGB image, then enlarged ``scale`` times (nearest)."""
    base = np.asarray(image.convert("RGB"), dtype=np.float64)
    height, width = base.shape[:2]
    rows, columns = colours.shape[:2]
    # Pixel (y, x) lies in patch (y * rows // height, x * columns // width): exact blocks when the grid
    # divides the image, blocks differing by at most one pixel otherwise.
    row_of = np.arange(height) * rows // height
    column_of = np.arange(width) * columns // width
    heat = colours[row_of[:, None], column_of[None, :]].astype(np.float64)
    blended = np.rint((1.0 - alpha) * base + alpha * heat).astype(np.uint8)
    result = Image.fromarray(blended, mode="RGB")
    if scale > 1:
        result = result.resize((width * scale, height * scale), Image.Resampling.NEAREST)
    return result


def _legend_labels(lo: float, hi: float) -> list[tuple[str, str]]:
    if hi > lo:
        return [(_format_value(hi), "top"), (_format_value((lo + hi) / 2), "middle"), (_format_value(lo), "bottom")]
    return [(_format_value(hi), "middle")]  # a single value: a single label


def _legend_width(lo: float, hi: float, font: _Font) -> int:
    text_width = max(_text_width(font, text) for text, _ in _legend_labels(lo, hi))
    return _PAD + _BAR_WIDTH + _LABEL_GAP + text_width + _PAD


def _legend(
    height: int, bar_top: int, bar_height: int, lo: float, hi: float, colormap: str, font: _Font
) -> Image.Image:
    """A vertical colour bar (top: vmax, bottom: vmin) with the values written beside it."""
    lut = _lut(colormap)
    legend = Image.new("RGB", (_legend_width(lo, hi, font), height), _BACKGROUND)
    indices = np.rint(np.linspace(255, 0, bar_height)).astype(np.intp)
    bar = np.repeat(lut[indices][:, None, :], _BAR_WIDTH, axis=1)
    legend.paste(Image.fromarray(np.ascontiguousarray(bar), mode="RGB"), (_PAD, bar_top))
    draw = ImageDraw.Draw(legend)
    draw.rectangle((_PAD - 1, bar_top - 1, _PAD + _BAR_WIDTH, bar_top + bar_height), outline=_TEXT)
    x = _PAD + _BAR_WIDTH + _LABEL_GAP
    for text, where in _legend_labels(lo, hi):
        left, top, _, bottom = draw.textbbox((0, 0), text, font=font)
        if where == "top":  # top-aligned with the bar
            y = bar_top - top
        elif where == "bottom":  # bottom-aligned with the bar
            y = bar_top + bar_height - bottom
        else:  # centred on the middle of the bar
            y = bar_top + bar_height // 2 - (top + bottom) // 2
        draw.text((x - left, y), text, font=font, fill=_TEXT)
    return legend


def _check_map(relevance: Any) -> npt.NDArray[np.float64]:
    data = np.asarray(relevance, dtype=np.float64)
    if data.ndim != 2 or 0 in data.shape:
        raise ValueError(f"a relevance map must be a non-empty 2-D [h, w] array, got shape {data.shape}")
    return data


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")


def render_overlay(
    image: Image.Image,
    relevance: np.ndarray,
    *,
    title: str = "",
    vmin: float | None = None,
    vmax: float | None = None,
    colormap: str = DEFAULT_COLORMAP,
    alpha: float = DEFAULT_ALPHA,
    scale: int | None = None,
    preprocessing: Preprocessing | None = None,
) -> Image.Image:
    """One relevance map over its image, with a title on top and a colour bar at the right.

    The ``[h, w]`` map is spread over the image as square patches (pixel row ``y`` belongs to patch row
    ``y * h // H``), blended with weight ``alpha``, and the result is enlarged ``scale`` times with nearest
    neighbour; by default the smallest integer factor that makes the shorter side at least :data:`MIN_SIDE`.
    ``preprocessing``: the manifest's steps that made ``image`` from the upload; when given, a small
    caption at the bottom says the map lies over the model's input (:func:`input_caption`).
    Returns an RGB image.
    """
    data = _check_map(relevance)
    _check_alpha(alpha)
    lo, hi = resolve_limits(data, vmin, vmax, colormap)
    font = _font()
    panel = _overlay(image, colorize(data, lo, hi, colormap), alpha, _scale_for(image.size, scale))
    width = _PAD + panel.width + _legend_width(lo, hi, font)
    heading = _text_block(title, width, font)
    top = heading.height if heading is not None else _PAD
    legend = _legend(top + panel.height + _PAD, top, panel.height, lo, hi, colormap, font)
    caption = _caption_block(image, preprocessing, width)
    canvas = Image.new("RGB", (width, legend.height + (caption.height if caption else 0)), _BACKGROUND)
    canvas.paste(panel, (_PAD, top))
    canvas.paste(legend, (_PAD + panel.width, 0))
    if caption is not None:
        canvas.paste(caption, (0, legend.height))
    if heading is not None:  # last: the title may run over the legend's column
        canvas.paste(heading, (0, 0))
    return canvas


def render_grid(
    image: Image.Image,
    maps: list[np.ndarray],
    titles: list[str],
    *,
    columns: int = 4,
    vmin: float | None = None,
    vmax: float | None = None,
    colormap: str = DEFAULT_COLORMAP,
    suptitle: str = "",
    preprocessing: Preprocessing | None = None,
) -> Image.Image:
    """Several maps over the same image (one per layer, say) in a grid sharing one colour scale and legend.

    The scale defaults to the min/max over *all* maps (symmetric around zero for a diverging colormap), so
    colours mean the same value in every cell. Cells are filled row by row, ``min(columns, len(maps))``
    per row; each has its title, and ``suptitle`` goes above the grid. ``preprocessing``: as in
    :func:`render_overlay`, a caption under the grid. Returns an RGB image.
    """
    if not maps:
        raise ValueError("render_grid needs at least one map")
    if len(titles) != len(maps):
        raise ValueError(f"got {len(maps)} maps but {len(titles)} titles")
    if columns < 1:
        raise ValueError(f"columns must be a positive integer, got {columns}")
    data = [_check_map(relevance) for relevance in maps]
    lo, hi = resolve_limits(data, vmin, vmax, colormap)
    font = _font()
    scale = _scale_for(image.size, None)
    panels = [_overlay(image, colorize(values, lo, hi, colormap), DEFAULT_ALPHA, scale) for values in data]
    cell_width, cell_height = panels[0].size
    headings = [_text_block(title, cell_width, font) for title in titles]
    heading_height = max((heading.height for heading in headings if heading is not None), default=_PAD)
    per_row = min(columns, len(panels))
    rows = math.ceil(len(panels) / per_row)
    grid_width = per_row * cell_width + (per_row - 1) * _PAD
    width = _PAD + grid_width + _legend_width(lo, hi, font)
    banner = _text_block(suptitle, width, font)
    grid_top = banner.height if banner is not None else 0
    row_height = heading_height + cell_height
    grid_height = rows * row_height + (rows - 1) * _PAD
    bar_top = grid_top + heading_height
    bar_height = grid_height - heading_height
    legend = _legend(grid_top + grid_height + _PAD, bar_top, bar_height, lo, hi, colormap, font)
    caption = _caption_block(image, preprocessing, width)
    canvas = Image.new("RGB", (width, legend.height + (caption.height if caption else 0)), _BACKGROUND)
    for index, (panel, heading) in enumerate(zip(panels, headings, strict=True)):
        x = _PAD + (index % per_row) * (cell_width + _PAD)
        y = grid_top + (index // per_row) * (row_height + _PAD)
        if heading is not None:
            canvas.paste(heading, (x, y + heading_height - heading.height))
        canvas.paste(panel, (x, y + heading_height))
    canvas.paste(legend, (_PAD + grid_width, 0))
    if caption is not None:
        canvas.paste(caption, (0, legend.height))
    if banner is not None:  # last: the title may run over the legend's column
        canvas.paste(banner, (0, 0))
    return canvas


def to_png_bytes(image: Image.Image) -> bytes:
    """The image as an optimised PNG file."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
