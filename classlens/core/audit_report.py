"""The files an audit is read in: ``rows.csv`` (one line per image), shared by the API and the CLI."""

from __future__ import annotations

import csv
import io
from typing import Any

# The columns of rows.csv: every scalar of an AuditRow (the per-layer locations stay in the JSON).
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


def rows_csv(result: dict[str, Any]) -> str:
    """One line per image with the :data:`CSV_COLUMNS`; empty cells for nulls, ``true``/``false`` for booleans.

    Text cells that a spreadsheet would read as a formula are escaped (:func:`spreadsheet_safe`).
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for row in result["rows"]:
        writer.writerow([_cell(row[column]) for column in CSV_COLUMNS])
    return buffer.getvalue()
