"""The files an audit is read in: ``rows.csv`` (one line per image), shared by the API and the CLI."""

from __future__ import annotations

import csv
import io
from typing import Any

# The columns of rows.csv: every scalar of an AuditRow, and its top-k classes as one cell (see
# :func:`top_k_cell`); the per-layer locations, the regions and the map stay in the JSON. Columns
# added later come last, so that a reader by position keeps reading the earlier ones.
CSV_COLUMNS = (
    "file",
    "true_index",
    "true_label",
    "predicted_index",
    "predicted_label",
    "probability",
    "correct",
    "predicted_emergence_layer",
    "true_emergence_layer",
    "explained_index",
    "explained_label",
    "peak_row",
    "peak_col",
    "central_share",
    "border_share",
    "confidence",
    "margin",
    "entropy",
    "top_k",
    "map_kind",
    "peak_ties",
)


# A cell a spreadsheet would read as a formula (or, after a tab or CR, as the start of one).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(text: str) -> str:
    """``text`` with a leading ``'`` when a spreadsheet would run it as a formula (OWASP's CSV injection rule).

    File names and labels come from clients: ``=HYPERLINK(...)`` as a file name would otherwise
    run in whoever opens rows.csv. Numbers are written by :func:`_cell` itself and left alone, so a
    negative number stays a number.
    """
    return f"'{text}" if text.startswith(FORMULA_STARTS) else text


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return spreadsheet_safe(str(value))


def top_k_cell(scores: list[dict[str, Any]]) -> str:
    """A row's top-k classes as one cell, best first: ``label:probability`` joined by ``;``.

    Read it from the right of each item (a label may hold a ``:``); a label holding a ``;`` makes
    the cell ambiguous, and report.json lists the same classes with their indices.
    """
    return spreadsheet_safe(";".join(f"{score['label']}:{score['probability']}" for score in scores))


def _column_cell(column: str, value: Any) -> str:
    return top_k_cell(value) if column == "top_k" and value is not None else _cell(value)


def rows_csv(result: dict[str, Any]) -> str:
    """One line per image with the :data:`CSV_COLUMNS`; empty cells for nulls, ``true``/``false`` for booleans.

    A column that a row lacks (a result of a server older than the column) is an empty cell. Text
    cells that a spreadsheet would read as a formula are escaped (:func:`spreadsheet_safe`).
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for row in result["rows"]:
        writer.writerow([_column_cell(column, row.get(column)) for column in CSV_COLUMNS])
    return buffer.getvalue()
