"""Job records as the API shows them: ISO timestamps, links, and the result once there is one.

A view holds the stored result either parsed or, with ``spliced``, as the stored bytes themselves
(an ``orjson.Fragment``): :func:`service.job_responses.job_response` writes those into the response
unchanged, so a result is never decoded and encoded again just to be sent (it was a cache hit's
largest cost for a big result). The links are read from the result parsed with orjson either way.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from flask import url_for

from classlens.core.contract import Job

REPORT = "report"  # the figure of an analysis that is its HTML report (compare), not a PNG


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def _stored(result: bytes, spliced: bool) -> tuple[Any, Any]:
    """The result as the view holds it (its bytes as they are, when ``spliced``; else parsed) and parsed."""
    parsed = orjson.loads(result)
    return (orjson.Fragment(result) if spliced else parsed), parsed


def job_view(job: Job, result: bytes | None = None, *, cached: bool = False, spliced: bool = False) -> dict[str, Any]:
    """The ``ExplanationJob`` of openapi.yaml; ``result`` is the stored result JSON, if any."""
    links: dict[str, Any] = {"self": url_for("explanations.get_explanation", id=job.id)}
    view = _common(job, links, cached)
    if result is not None:
        view["result"], explanation = _stored(result, spliced)
        links["maps"] = {
            str(target["index"]): url_for("explanations.get_map", id=job.id, target=str(target["index"]))
            for target in explanation["targets"]
        }
    return view


def audit_view(job: Job, result: bytes | None = None, *, cached: bool = False, spliced: bool = False) -> dict[str, Any]:
    """The ``AuditJob`` of openapi.yaml: with the result and its download links once it has succeeded."""
    links: dict[str, Any] = {"self": url_for("audits.get_audit", id=job.id)}
    view = _common(job, links, cached)
    if result is not None:
        # The links do not depend on the result: it need not be parsed at all.
        view["result"] = orjson.Fragment(result) if spliced else orjson.loads(result)
        links["rows_csv"] = url_for("audits.get_rows_csv", id=job.id)
        links["report"] = url_for("audits.get_report", id=job.id)
    return view


def analysis_view(
    job: Job, result: bytes | None = None, *, cached: bool = False, spliced: bool = False
) -> dict[str, Any]:
    """The ``AnalysisJob`` of openapi.yaml: with the result and the links to its figures once it has succeeded."""
    links: dict[str, Any] = {"self": url_for("analyses.get_analysis", id=job.id)}
    view = _common(job, links, cached)
    if result is not None:
        view["result"], analysis = _stored(result, spliced)
        names = sorted(analysis["figures"])
        links["figures"] = {
            name: url_for("analyses.get_figure", id=job.id, name=name) for name in names if name != REPORT
        }
        if REPORT in names:
            links["report"] = url_for("analyses.get_report", id=job.id)
    return view


def model_job_view(
    job: Job, result: bytes | None = None, *, cached: bool = False, spliced: bool = False
) -> dict[str, Any]:
    """The ``ModelJob`` of openapi.yaml: a registration, with what was registered and its link once it succeeded."""
    links: dict[str, Any] = {"self": url_for("models.get_model_job", id=job.id)}
    view = _common(job, links, cached)
    if result is not None:
        view["result"], registered = _stored(result, spliced)
        links["model"] = url_for("models.get_model", name=registered["reference"])
    return view


def _common(job: Job, links: dict[str, Any], cached: bool) -> dict[str, Any]:
    return {
        "id": job.id,
        "kind": job.kind,
        "status": job.status,
        "created_at": _iso(job.created_at),
        "updated_at": _iso(job.updated_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "model": job.model,
        "parameters": job.parameters,
        "progress": job.progress.model_dump(),
        "error": job.error.model_dump() if job.error else None,
        "cached": cached,
        "links": links,
    } | ({"batch_size": job.batch_size} if job.batch_size is not None else {})
