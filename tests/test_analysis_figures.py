"""Figures are PNGs people can open; the report is one self-contained HTML page."""

import io
import math

import numpy as np
from PIL import Image

from worker.analyses import figures
from worker.analyses.report import Section, Table, html_report


def opened(png: bytes) -> Image.Image:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(png))
    image.load()
    assert image.width > 200
    assert image.height > 150
    return image


def test_every_figure_is_a_png():
    matrix = np.array([[1.0, 0.5, math.nan], [0.5, 1.0, 0.2]])
    opened(figures.heatmap(matrix, ["a", "b"], ["x", "y", "z"], title="t", row_label="r", column_label="c"))
    many = [f"block {i}" for i in range(60)]  # more names than fit: every k-th is labelled
    opened(figures.heatmap(np.eye(60), many, many, title="t", row_label="r", column_label="c"))
    opened(figures.head_scatter({"m1": np.random.rand(6, 4), "m2": np.random.rand(6, 4)}, title="t"))
    opened(
        figures.layer_curves(
            ["b1", "b2", "b3"],
            {"x": [0.1, None, 0.3], "y": np.array([0.2, 0.3, 0.4])},
            title="t",
            ylabel="y",
            limits=(0, 1),
            reference=(0.1, "chance"),
        )
    )
    opened(figures.localisation_grid(np.random.rand(6, 2, 3), (2, 3), title="t"))


def test_the_report_embeds_its_figures_and_escapes_text():
    png = figures.layer_curves(["a"], {"x": [1.0]}, title="t", ylabel="y")
    page = html_report(
        "A <b>vs</b> B",
        Table(["", "A"], [["name", "<script>"], ["value", 0.123456], ["missing", None]]),
        [Section("CKA", "note & more", [("the figure", png)], [Table(["k"], [[math.nan]], caption="c")])],
    ).decode("utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("data:image/png;base64,") == 1
    assert "<script>" not in page
    assert "&lt;script&gt;" in page
    assert "A &lt;b&gt;vs&lt;/b&gt; B" in page
    assert "0.123" in page
    assert "&ndash;" in page
    assert "http://" not in page
    assert "https://" not in page
