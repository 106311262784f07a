"""The pages people open in a browser: ``/ui`` (submit an image) and ``/v1/explanations/{id}/view`` (the viewer).

Plain HTML from ``service/templates`` with the script and style sheet of ``service/static``
(``/static/...``): no inline script, no CDN, no build step. The pages hold no data: their
script reads the job and result JSON from the API routes, so a page needs no key of its
own. Every page is sent with :data:`CONTENT_SECURITY_POLICY` (docs/viewer.md).
"""

from __future__ import annotations

import csv
from functools import cache

from flask import Blueprint, Response, render_template, send_file

from model_store.catalog import BUNDLED_SAMPLES
from service.errors import Problem

blueprint = Blueprint("pages", __name__)

# Only this origin's scripts, styles and images (and blob: for the preview of a file being uploaded);
# no inline script or style element, no plugin, no framing, forms post here only.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)


@blueprint.after_request
def _strict_policy(response: Response) -> Response:
    """The one place the pages' security headers are set."""
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


@cache
def bundled_samples() -> tuple[tuple[str, str], ...]:
    """(file, label) of each bundled sample image, in the order of its labels.csv."""
    with (BUNDLED_SAMPLES / "labels.csv").open() as stream:
        return tuple((row["file"], row["label"]) for row in csv.DictReader(stream))


@blueprint.get("/ui")
def ui() -> str:
    return render_template("ui.html", samples=bundled_samples())


@blueprint.get("/ui/samples/<name>")
def sample(name: str) -> Response:
    """One bundled sample image, by the file name that /ui lists."""
    if name not in {file for file, _ in bundled_samples()}:
        raise Problem(404, "Unknown sample", f"no bundled sample is named {name!r}", problem="unknown_sample")
    return send_file(BUNDLED_SAMPLES / name, mimetype="image/png", max_age=3600)


@blueprint.get("/v1/explanations/<id>/view")
def view(id: str) -> str:
    return render_template("view.html", job_id=id)


@blueprint.get("/v1/audits/<id>/view")
def audit(id: str) -> str:
    """The audit browser: its script follows the audit, then shows its rows, confusion and histograms."""
    return render_template("audit.html", job_id=id)
