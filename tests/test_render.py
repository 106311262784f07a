"""Rendering of relevance maps as PNG images (classlens.core.render): colours, overlays, grids, PNG bytes."""

from __future__ import annotations

import io
import subprocess
import sys
import warnings
from typing import Any

import numpy as np
import pytest
from PIL import Image

from classlens.core.render import (
    COLORMAPS,
    DEFAULT_ALPHA,
    MIN_SIDE,
    NAN_COLOR,
    colorize,
    input_caption,
    render_grid,
    render_overlay,
    resolve_limits,
    to_png_bytes,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GREY = 128


def grey_image(height: int = 28, width: int = 28) -> Image.Image:
    """A uniform mid-grey image: nothing on it is white, so blended pixels never match the background."""
    return Image.new("L", (width, height), GREY)


def gradient_image(size: int = 28) -> Image.Image:
    return Image.fromarray(np.tile(np.linspace(0, 255, size).astype(np.uint8), (size, 1)), mode="L")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int64)


def panel_box(relevance: np.ndarray, image: Image.Image, **kwargs: Any) -> tuple[np.ndarray, int, int]:
    """The overlay panel of a rendering, found as the pixels that change with alpha (legend and title do not).

    Returns (panel pixels rendered with alpha=1 unless given, top, left).
    """
    alpha = kwargs.pop("alpha", 1.0)
    shown = pixels(render_overlay(image, relevance, alpha=alpha, **kwargs))
    bare = pixels(render_overlay(image, relevance, alpha=0.0, **kwargs))
    assert shown.shape == bare.shape
    rows, columns = np.nonzero((shown != bare).any(axis=2))
    top, bottom, left, right = rows.min(), rows.max() + 1, columns.min(), columns.max() + 1
    return shown[top:bottom, left:right], int(top), int(left)


def distance(block: np.ndarray, colour: np.ndarray) -> float:
    return float(np.linalg.norm(block.reshape(-1, 3) - colour.astype(np.int64), axis=1).mean())


# Colour tables ---------------------------------------------------------------------------------------------


def test_colormaps_are_256_entry_uint8_tables() -> None:
    assert {"inferno", "viridis", "RdBu"} <= set(COLORMAPS)
    for name, lut in COLORMAPS.items():
        assert lut.shape == (256, 3), name
        assert lut.dtype == np.uint8, name


@pytest.mark.parametrize(
    ("name", "first", "middle", "last"),
    [
        # matplotlib's values at 0, 0.5 and 1 (inferno(0.5) = #bc3754, viridis(0.5) = #21918c).
        ("inferno", (0, 0, 4), (188, 55, 84), (252, 255, 164)),
        ("viridis", (68, 1, 84), (33, 145, 140), (253, 231, 37)),
        ("RdBu", (103, 0, 31), (247, 247, 247), (5, 48, 97)),
    ],
)
def test_colormaps_follow_matplotlib(
    name: str, first: tuple[int, ...], middle: tuple[int, ...], last: tuple[int, ...]
) -> None:
    lut = COLORMAPS[name].astype(np.int64)
    assert tuple(lut[0]) == first
    assert tuple(lut[-1]) == last
    assert np.abs(lut[127:129].mean(axis=0) - np.array(middle)).max() <= 4


def test_inferno_gets_brighter_from_bottom_to_top() -> None:
    luminance = COLORMAPS["inferno"].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.all(np.diff(luminance) >= -0.5)
    assert luminance[-1] - luminance[0] > 200


def test_rdbu_r_is_rdbu_reversed() -> None:
    assert np.abs(COLORMAPS["RdBu_r"].astype(int) - COLORMAPS["RdBu"][::-1].astype(int)).max() <= 1


def test_tables_are_read_only() -> None:
    with pytest.raises(ValueError, match="read-only"):
        COLORMAPS["inferno"][0] = (1, 2, 3)


# colorize ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("colormap", ["inferno", "viridis"])
def test_colorize_ramp_spans_the_table(colormap: str) -> None:
    ramp = np.linspace(-2.0, 5.0, 12).reshape(3, 4)
    lut = COLORMAPS[colormap]
    out = colorize(ramp, colormap=colormap)
    assert out.shape == (3, 4, 3)
    assert out.dtype == np.uint8
    assert tuple(out[0, 0]) == tuple(lut[0])
    assert tuple(out[-1, -1]) == tuple(lut[-1])
    expected = lut[np.rint((ramp - ramp.min()) / np.ptp(ramp) * 255).astype(int)]
    np.testing.assert_array_equal(out, expected)


def test_colorize_clips_to_vmin_vmax() -> None:
    lut = COLORMAPS["inferno"]
    out = colorize(np.array([[-10.0, 0.0, 0.5, 1.0, 10.0]]), vmin=0.0, vmax=1.0)
    np.testing.assert_array_equal(out[0], lut[[0, 0, 128, 255, 255]])


def test_colorize_single_limit_uses_data_for_the_other() -> None:
    lut = COLORMAPS["inferno"]
    out = colorize(np.array([[0.0, 2.0, 4.0]]), vmin=2.0)
    np.testing.assert_array_equal(out[0], lut[[0, 0, 255]])
    out = colorize(np.array([[0.0, 2.0, 4.0]]), vmax=2.0)
    np.testing.assert_array_equal(out[0], lut[[0, 255, 255]])


def test_colorize_nan_is_grey_and_does_not_disturb_the_rest() -> None:
    lut = COLORMAPS["inferno"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = colorize(np.array([[np.nan, 0.0, 1.0, np.inf, -np.inf]]))
        all_nan = colorize(np.full((2, 2), np.nan))
    assert tuple(out[0, 0]) == NAN_COLOR
    np.testing.assert_array_equal(out[0, 1:], lut[[0, 255, 255, 0]])
    assert (all_nan == np.array(NAN_COLOR, dtype=np.uint8)).all()


def test_colorize_constant_map_does_not_divide_by_zero() -> None:
    lut = COLORMAPS["inferno"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = colorize(np.full((7, 7), 3.0))
        pinned = colorize(np.array([[1.0, 2.0, 3.0]]), vmin=2.0, vmax=2.0)
    assert (out == lut[128]).all()
    np.testing.assert_array_equal(pinned[0], lut[[0, 128, 255]])


def test_colorize_diverging_scale_is_symmetric_around_zero() -> None:
    lut = COLORMAPS["RdBu"]
    out = colorize(np.array([[-1.0, 0.0, 3.0]]), colormap="RdBu")
    np.testing.assert_array_equal(out[0], lut[[85, 128, 255]])  # scale -3 .. 3
    assert resolve_limits(np.array([-1.0, 3.0]), colormap="RdBu_r") == (-3.0, 3.0)
    assert resolve_limits(np.array([-1.0, 3.0]), colormap="inferno") == (-1.0, 3.0)


def test_resolve_limits_over_several_maps() -> None:
    maps = [np.zeros((2, 2)), np.full((3, 3), 5.0), np.array([[np.nan, -1.0]])]
    assert resolve_limits(maps) == (-1.0, 5.0)
    assert resolve_limits(maps, vmin=0.0) == (0.0, 5.0)
    assert resolve_limits([np.full((2, 2), np.nan)]) == (0.0, 0.0)


def test_bad_limits_raise() -> None:
    with pytest.raises(ValueError, match="vmin"):
        colorize(np.zeros((2, 2)), vmin=1.0, vmax=0.0)
    with pytest.raises(ValueError, match="finite"):
        colorize(np.zeros((2, 2)), vmin=float("nan"))


def test_unknown_colormap_raises_and_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="jet") as error:
        colorize(np.zeros((2, 2)), colormap="jet")
    for name in ("inferno", "viridis", "RdBu"):
        assert name in str(error.value)
    with pytest.raises(ValueError, match="inferno"):
        render_overlay(grey_image(), np.zeros((7, 7)), colormap="jet")
    with pytest.raises(ValueError, match="inferno"):
        render_grid(grey_image(), [np.zeros((7, 7))], ["a"], colormap="jet")


# render_overlay ---------------------------------------------------------------------------------------------


def test_overlay_is_rgb_and_enlarged_to_at_least_224() -> None:
    rng = np.random.default_rng(0)
    out = render_overlay(gradient_image(), rng.random((7, 7)), title="layer 11")
    assert out.mode == "RGB"
    assert min(out.size) >= MIN_SIDE
    panel, _, _ = panel_box(rng.random((7, 7)), grey_image())
    assert panel.shape[:2] == (224, 224)  # 28 px times 8
    wide, _, _ = panel_box(rng.random((7, 7)), grey_image(28, 56))
    assert wide.shape[:2] == (224, 448)
    large, _, _ = panel_box(rng.random((14, 14)), grey_image(300, 300))
    assert large.shape[:2] == (300, 300)  # never shrunk, not enlarged when already large enough
    small, _, _ = panel_box(rng.random((7, 7)), grey_image(), scale=2)
    assert small.shape[:2] == (56, 56)


def test_overlay_puts_the_highest_patch_where_it_belongs() -> None:
    relevance = np.random.default_rng(1).uniform(0.3, 0.7, (7, 7))
    relevance[5, 2] = 1.0
    relevance[1, 4] = 0.0
    lut = COLORMAPS["inferno"]
    panel, _, _ = panel_box(relevance, gradient_image(), alpha=DEFAULT_ALPHA)
    side = panel.shape[0] // 7
    assert side == 32

    def block(row: int, column: int) -> np.ndarray:
        return panel[row * side : (row + 1) * side, column * side : (column + 1) * side]

    high, low = block(5, 2), block(1, 4)
    assert distance(high, lut[-1]) < distance(low, lut[-1])
    assert distance(low, lut[0]) < distance(high, lut[0])
    # Crisp patches: within one patch, pixels differ only where the image under it does (columns).
    assert (np.ptp(high, axis=0) == 0).all()


def test_overlay_maps_pixels_to_patches_when_the_grid_does_not_divide_the_image() -> None:
    relevance = np.arange(49, dtype=np.float64).reshape(7, 7)
    panel, _, _ = panel_box(relevance, grey_image(30, 30), scale=1)  # alpha=1: the patch colours themselves
    assert panel.shape[:2] == (30, 30)
    index = np.arange(30) * 7 // 30
    expected = colorize(relevance)[index[:, None], index[None, :]]
    np.testing.assert_array_equal(panel, expected)


def test_overlay_title_adds_a_strip_on_top() -> None:
    relevance = np.random.default_rng(2).random((7, 7))
    plain = render_overlay(grey_image(), relevance)
    titled = render_overlay(grey_image(), relevance, title="fmnist-vit · layer 11")
    long_title = render_overlay(grey_image(), relevance, title="a long title " * 8)
    assert titled.height > plain.height
    assert long_title.height > titled.height  # wrapped, not cut off
    assert titled.width == plain.width


def test_overlay_legend_is_a_colour_bar_with_max_on_top() -> None:
    relevance = np.random.default_rng(3).random((7, 7))
    lut = COLORMAPS["viridis"]
    out = pixels(render_overlay(grey_image(), relevance, colormap="viridis", vmin=0.0, vmax=1.0))
    panel, _, left = panel_box(relevance, grey_image(), colormap="viridis", vmin=0.0, vmax=1.0)
    legend = out[:, left + panel.shape[1] :]
    top_rows = np.nonzero((legend == lut[-1]).all(axis=2).any(axis=1))[0]
    bottom_rows = np.nonzero((legend == lut[0]).all(axis=2).any(axis=1))[0]
    assert top_rows.size
    assert bottom_rows.size
    assert top_rows.max() < bottom_rows.min()
    # The bar spans (about) the panel's height.
    assert bottom_rows.max() - top_rows.min() >= 0.9 * panel.shape[0]


def test_overlay_legend_writes_the_limits() -> None:
    relevance = np.random.default_rng(3).random((7, 7))
    panel, _, left = panel_box(relevance, grey_image(), vmin=0.0, vmax=1.0)
    right = left + panel.shape[1]
    one = pixels(render_overlay(grey_image(), relevance, vmin=0.0, vmax=1.0))[:, right:]
    other = pixels(render_overlay(grey_image(), relevance, vmin=0.0, vmax=1.5))[:, right:]
    same = pixels(render_overlay(grey_image(), relevance * 0.5, vmin=0.0, vmax=1.0))[:, right:]
    np.testing.assert_array_equal(one, same)  # the legend depends on the scale, not on the map
    assert one.shape != other.shape or (one != other).any()


def test_overlay_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="2-D"):
        render_overlay(grey_image(), np.zeros(49))
    with pytest.raises(ValueError, match="alpha"):
        render_overlay(grey_image(), np.zeros((7, 7)), alpha=1.5)
    with pytest.raises(ValueError, match="scale"):
        render_overlay(grey_image(), np.zeros((7, 7)), scale=0)


def test_overlay_accepts_rgba_and_constant_maps() -> None:
    image = Image.new("RGBA", (28, 28), (10, 200, 30, 128))
    out = render_overlay(image, np.zeros((7, 7)), title="constant")
    assert out.mode == "RGB"


# render_grid -------------------------------------------------------------------------------------------------


def blended(colour: np.ndarray) -> np.ndarray:
    return np.rint((1 - DEFAULT_ALPHA) * GREY + DEFAULT_ALPHA * colour.astype(np.float64)).astype(np.int64)


def count_colour(image: np.ndarray, colour: np.ndarray) -> int:
    return int((image == colour).all(axis=2).sum())


def test_grid_shares_one_scale_over_all_cells() -> None:
    # Map i is constant i: with one shared scale 0..5 cell i has colour lut[i * 51]; with a scale per map
    # every cell would get the middle colour.
    lut = COLORMAPS["inferno"]
    maps = [np.full((7, 7), float(i)) for i in range(6)]
    out = pixels(render_grid(grey_image(), maps, [f"layer {i}" for i in range(6)], columns=3, suptitle="all"))
    cell = 224 * 224
    for i in range(6):
        found = count_colour(out, blended(lut[i * 51]))
        assert cell <= found < cell + 500, (i, found)


def test_grid_explicit_limits() -> None:
    lut = COLORMAPS["inferno"]
    maps = [np.full((7, 7), 5.0), np.full((7, 7), 20.0)]
    out = pixels(render_grid(grey_image(), maps, ["a", "b"], vmin=0.0, vmax=10.0))
    assert count_colour(out, blended(lut[128])) >= 224 * 224
    assert count_colour(out, blended(lut[255])) >= 224 * 224


def test_grid_size_follows_columns_and_rows() -> None:
    rng = np.random.default_rng(4)
    maps = [rng.random((7, 7)) for _ in range(6)]
    titles = [f"layer {i}" for i in range(6)]
    one_row = render_grid(grey_image(), maps, titles, columns=6)
    two_rows = render_grid(grey_image(), maps, titles, columns=3)
    three_rows = render_grid(grey_image(), maps, titles, columns=2)
    assert one_row.mode == two_rows.mode == "RGB"
    assert one_row.width > two_rows.width > three_rows.width
    assert one_row.height < two_rows.height < three_rows.height
    # One more column adds one cell width; one more row adds one cell height.
    assert two_rows.width - three_rows.width >= 224
    assert three_rows.height - two_rows.height >= 224
    assert one_row.width >= 6 * 224
    assert three_rows.height >= 3 * 224
    # More columns than maps: no empty cells.
    assert render_grid(grey_image(), maps, titles, columns=10).size == one_row.size


def test_grid_suptitle_adds_a_strip() -> None:
    maps = [np.zeros((7, 7)), np.ones((7, 7))]
    plain = render_grid(grey_image(), maps, ["a", "b"])
    titled = render_grid(grey_image(), maps, ["a", "b"], suptitle="relevance per layer")
    assert titled.height > plain.height
    assert titled.width == plain.width


def test_grid_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="titles"):
        render_grid(grey_image(), [np.zeros((7, 7))] * 2, ["only one"])
    with pytest.raises(ValueError, match="at least one"):
        render_grid(grey_image(), [], [])
    with pytest.raises(ValueError, match="columns"):
        render_grid(grey_image(), [np.zeros((7, 7))], ["a"], columns=0)


# The caption: maps lie over the model's input ---------------------------------------------------------------


def test_caption_says_the_map_lies_over_the_models_input() -> None:
    from model_store.manifest import Preprocessing

    cropped = Preprocessing(resize=(32, 32), resize_mode="shorter", crop=(28, 28), mean=(0.5,), std=(0.5,))
    exact = Preprocessing(resize=(28, 28), mean=(0.5,), std=(0.5,))
    trimmed = cropped.model_copy(update={"trim_border": 2})
    assert input_caption(grey_image(), cropped) == "drawn over the model's 28x28 input (after resize and crop)"
    assert input_caption(grey_image(), exact) == "drawn over the model's 28x28 input (after resize)"
    trimmed_caption = "drawn over the model's 28x28 input (after border trim, resize and crop)"
    assert input_caption(grey_image(), trimmed) == trimmed_caption
    with pytest.raises(ValueError, match="as the model saw it"):
        input_caption(grey_image(30, 40), cropped)  # not the model's input: the caption would mislead


def test_caption_adds_a_strip_below_and_leaves_the_rest_unchanged() -> None:
    from model_store.manifest import Preprocessing

    steps = Preprocessing(resize=(32, 32), resize_mode="shorter", crop=(28, 28), mean=(0.5,), std=(0.5,))
    relevance = np.random.default_rng(6).random((7, 7))
    plain = pixels(render_overlay(grey_image(), relevance, title="t"))
    captioned = pixels(render_overlay(grey_image(), relevance, title="t", preprocessing=steps))
    assert captioned.shape[1] == plain.shape[1]
    assert captioned.shape[0] > plain.shape[0]
    np.testing.assert_array_equal(captioned[: plain.shape[0]], plain)  # map, title and legend as before
    assert (captioned[plain.shape[0] :] != 255).any()  # the strip holds text
    maps = [relevance, relevance * 2]
    grid = pixels(render_grid(grey_image(), maps, ["a", "b"]))
    captioned_grid = pixels(render_grid(grey_image(), maps, ["a", "b"], preprocessing=steps))
    assert captioned_grid.shape[0] > grid.shape[0]
    np.testing.assert_array_equal(captioned_grid[: grid.shape[0]], grid)


# PNG and dependencies ---------------------------------------------------------------------------------------


def test_png_bytes_decode_to_the_same_image() -> None:
    image = render_overlay(gradient_image(), np.random.default_rng(5).random((7, 7)), title="png")
    data = to_png_bytes(image)
    assert data.startswith(PNG_SIGNATURE)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == "PNG"
    assert decoded.size == image.size
    np.testing.assert_array_equal(np.asarray(decoded.convert("RGB")), np.asarray(image))


def test_render_imports_neither_torch_nor_matplotlib() -> None:
    code = (
        "import sys, classlens.core.render; "
        "bad = [m for m in ('torch', 'matplotlib') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
