"""The pages people open in a browser, and every file they load.

``/ui`` (submit an image) and ``/v1/explanations/{id}/view`` (the viewer) are plain HTML from
``service/templates`` with the scripts and style sheets of ``service/static``: no inline script,
no CDN, no build step. The pages hold no data: their script reads the job and result JSON from
the API routes (with the API key the user typed, when the service asks for one: ``api.js``).
Every page is sent with :data:`CONTENT_SECURITY_POLICY` (docs/viewer.md).

``/static/{name}`` is the one route for the files of every page, ``/docs`` included: the files
of ``service/static`` and the few of the installed Swagger UI that ``/docs`` loads. Pages name
them with :func:`static_url`, which adds a digest of the file's content (``?v=``): a browser
keeps a file named with its current digest a year and revalidates any other request, so a new
release is fetched at once and an unchanged one never.
"""

from __future__ import annotations

import csv
import hashlib
from functools import cache
from pathlib import Path

from flask import Blueprint, Response, render_template, request, send_file

from model_store.catalog import BUNDLED_SAMPLES
from service.docs import SWAGGER_UI_FILES
from service.errors import Problem

blueprint = Blueprint("pages", __name__)

STATIC = Path(__file__).resolve().parents[1] / "static"
MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml", ".png": "image/png"}
# Only this origin's scripts, styles and images (and blob: for pictures read with the API key and
# for the preview of a file being uploaded); no inline script or style element, no plugin, no
# framing, forms post here only.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
YEAR = 365 * 24 * 3600


@cache
def static_files() -> dict[str, Path]:
    """What ``/static/{name}`` serves: the files of ``service/static`` and Swagger UI's (nothing else)."""
    own = {path.name: path for path in sorted(STATIC.iterdir()) if path.suffix in MEDIA_TYPES}
    return own | SWAGGER_UI_FILES


@cache
def _digest(path: Path, modified_ns: int) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def fingerprint(name: str) -> str:
    """The digest of a static file's content (read again when the file changes on disk)."""
    path = static_files()[name]
    return _digest(path, path.stat().st_mtime_ns)


@blueprint.app_template_global()
def static_url(name: str) -> str:
    """The address of a static file, versioned by its content."""
    return f"/static/{name}?v={fingerprint(name)}"


@blueprint.after_request
def _strict_policy(response: Response) -> Response:
    """The one place the pages' security headers are set."""
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


@blueprint.get("/static/<name>")
def static_file(name: str) -> Response:
    """One file of a page: kept a year when asked for by its current digest, else revalidated."""
    path = static_files().get(name)
    if path is None:
        raise Problem(404, "Not found", f"no static file is named {name!r}", problem="unknown_asset")
    response = send_file(path, mimetype=MEDIA_TYPES[path.suffix], conditional=True, max_age=None)
    current = request.args.get("v") == fingerprint(name)
    response.headers["Cache-Control"] = f"public, max-age={YEAR}, immutable" if current else "no-cache"
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
