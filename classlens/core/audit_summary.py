"""``summary.html``: an audit's result as one standalone page, written by ``classlens audit``.

Self-contained on purpose: no script, no link, no image, nothing fetched, so the file can be
mailed, archived or opened offline and shows the same thing. Everything that comes from users
(file names, labels, the model's name) is HTML-escaped: a file called ``<script>...`` is text.
The rows table has the columns of ``rows.csv`` (:data:`classlens.core.audit_report.CSV_COLUMNS`),
so the page and the CSV never disagree about what a row holds.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from classlens.core.audit_report import CSV_COLUMNS

# Confusion cells are shaded in five steps of viridis (readable with every common colour-vision
# deficiency); the count is always written in the cell too.
SHADES = 5
STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 1.5rem auto; max-width: 72rem; padding: 0 1rem;
       color: #1b1b1b; background: #fff; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: .5rem 0; }
th, td { border: 1px solid #bbb; padding: .25rem .5rem; text-align: right; white-space: nowrap; }
th { background: #f1f1f1; } th[scope=row], td.text { text-align: left; }
dl { display: grid; grid-template-columns: max-content auto; gap: .2rem 1rem; } dt { font-weight: 600; }
meter { width: 16rem; max-width: 50vw; }
.s1 { background: #fde725; } .s2 { background: #5ec962; } .s3 { background: #21918c; color: #fff; }
.s4 { background: #3b528b; color: #fff; } .s5 { background: #440154; color: #fff; }
"""


def _text(value: Any) -> str:
    """A cell's text, escaped: empty for null, ``yes``/``no`` for booleans, at most 4 decimals for a fraction."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1 else f"{value:.2f}".rstrip("0").rstrip(".")
    return html.escape(str(value))


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _overview(result: Mapping[str, Any]) -> str:
    totals = result["aggregates"]
    model = result["model"]
    grid = result.get("grid") or ("?", "?")
    facts: list[tuple[str, str]] = [
        ("model", f"{model['name']}@{model['version']}"),
        ("images", str(totals["images"])),
        ("labelled", str(totals["labelled"])),
        ("correct", str(totals["correct"])),
        ("accuracy", _share(totals["accuracy"])),
        ("mean top-1 probability", f"{totals['mean_top1_probability']:.3f}"),
        ("map kind", str(result.get("map_kind", ""))),
        ("relevance layer", f"{result.get('relevance_layer', '')} of {result.get('layers', '')}"),
        ("grid", f"{grid[0]} x {grid[1]}"),
        ("mean central share", _share(totals.get("mean_central_share"))),
        ("central cells share (a uniform map's)", _share(totals.get("central_cells_share"))),
    ]
    items = "".join(f"<dt>{html.escape(name)}</dt><dd>{html.escape(value)}</dd>" for name, value in facts)
    return f"<dl>{items}</dl>"


def _shade(count: int, most: int) -> str:
    if count <= 0 or most <= 0:
        return ""
    return f' class="s{max(1, min(SHADES, round(SHADES * count / most)))}"'


def _confusion(cells: Sequence[Mapping[str, Any]]) -> str:
    if not cells:
        return "<p>No labelled images: no confusion matrix.</p>"
    true = sorted({(cell["true_index"], cell["true_label"]) for cell in cells})
    predicted = sorted({(cell["predicted_index"], cell["predicted_label"]) for cell in cells})
    counts = {(cell["true_index"], cell["predicted_index"]): int(cell["count"]) for cell in cells}
    most = max(counts.values())
    head = "".join(f'<th scope="col">{_text(label)}</th>' for _, label in predicted)
    lines = []
    for index, label in true:
        row = "".join(
            f"<td{_shade(counts.get((index, column), 0), most)}>{counts.get((index, column), 0)}</td>"
            for column, _ in predicted
        )
        lines.append(f'<tr><th scope="row">{_text(label)}</th>{row}</tr>')
    return (
        '<div class="scroll"><table><caption>Rows: true class; columns: predicted class.</caption>'
        f'<thead><tr><th scope="col">true \\ predicted</th>{head}</tr></thead>'
        f"<tbody>{''.join(lines)}</tbody></table></div>"
    )


def _histogram(histogram: Mapping[str, int]) -> str:
    most = max(histogram.values(), default=0)
    lines = [
        f'<tr><th scope="row">{_text(layer)}</th><td>{count}</td>'
        f'<td><meter min="0" max="{max(most, 1)}" value="{count}">{count}</meter></td></tr>'
        for layer, count in histogram.items()
    ]
    return (
        "<table><caption>Images by the layer from which their predicted class stays top-1.</caption>"
        '<thead><tr><th scope="col">layer</th><th scope="col">images</th><th scope="col">share</th></tr></thead>'
        f"<tbody>{''.join(lines)}</tbody></table>"
    )


def _by_class(classes: Iterable[Mapping[str, Any]]) -> str:
    lines = [
        f'<tr><th scope="row">{_text(entry["label"])}</th><td>{entry["images"]}</td>'
        f"<td>{_text(entry['mean_emergence_layer'])}</td><td>{entry['never']}</td></tr>"
        for entry in classes
    ]
    return (
        '<table><thead><tr><th scope="col">predicted class</th><th scope="col">images</th>'
        '<th scope="col">mean emergence layer</th><th scope="col">never emerged</th></tr></thead>'
        f"<tbody>{''.join(lines)}</tbody></table>"
    )


def _rows(rows: Sequence[Mapping[str, Any]]) -> str:
    head = "".join(f'<th scope="col">{html.escape(column)}</th>' for column in CSV_COLUMNS)
    lines = []
    for row in rows:
        cells = "".join(
            f'<td class="text">{_text(row.get(column))}</td>'
            if isinstance(row.get(column), str)
            else f"<td>{_text(row.get(column))}</td>"
            for column in CSV_COLUMNS
        )
        lines.append(f"<tr>{cells}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(lines)}</tbody></table></div>'


def summary_html(result: Mapping[str, Any]) -> str:
    """The page for an audit result (the JSON object ``GET /v1/audits/{id}/report.json`` sends)."""
    model, totals = result["model"], result["aggregates"]
    title = html.escape(f"ClassLens audit of {totals['images']} images by {model['name']}@{model['version']}")
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            # Nothing to load, nothing to run: the page holds everything it shows.
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">",
            f"<title>{title}</title><style>{STYLE}</style></head><body>",
            f"<h1>{title}</h1>",
            _overview(result),
            "<h2>Confusion matrix</h2>",
            _confusion(totals["confusion"]),
            "<h2>Emergence of the predicted class</h2>",
            _histogram(totals["emergence_histogram"]),
            _by_class(totals["mean_emergence_by_class"]),
            f"<h2>Rows ({len(result['rows'])})</h2>",
            _rows(result["rows"]),
            "</body></html>",
            "",
        ]
    )
