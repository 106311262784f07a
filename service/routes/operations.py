"""Health (``/livez``, ``/readyz``), ``/metrics``, and the contract (``/openapi.yaml``, ``/docs``)."""

from __future__ import annotations

import time

from flask import Blueprint, Response, jsonify
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from classlens.core.heartbeat import last_beat
from classlens.core.store import StoreError
from service.app import services
from service.docs import CONTENT_SECURITY_POLICY, render_docs
from service.errors import Problem, problem_response
from service.routes.pages import static_url

blueprint = Blueprint("operations", __name__)


@blueprint.get("/livez")
def livez() -> Response:
    """The process answers; nothing else is checked (a failing dependency must not get it restarted)."""
    return jsonify({"status": "ok"})


@blueprint.get("/readyz")
def readyz() -> Response:
    """Ready when the store answers, the catalog has models and a worker beat recently; says if it authenticates."""
    parts = services()
    checks: dict[str, str] = {}
    ready = True
    try:
        parts.store.ping()
        checks["store"] = "ok"
        beat = last_beat(parts.store)
    except StoreError as error:
        checks["store"] = f"unreachable: {error}"
        ready, beat = False, None
    count = len(parts.catalog.entries)
    checks["catalog"] = f"ok ({count} model versions)" if count else "no models found"
    ready = ready and count > 0
    if beat is not None:
        checks["worker"] = f"ok ({beat.get('worker')}, {time.time() - float(str(beat.get('at', 0))):.1f} s ago)"
    else:
        checks["worker"] = "no worker heartbeat"
        ready = False
    # Said on every probe, so that a service left open (authentication off) is plain to whoever watches it.
    authentication = {"enabled": parts.auth.enabled, "detail": parts.auth.reason}
    if ready:
        return jsonify({"status": "ready", "checks": checks, "authentication": authentication})
    failing = ", ".join(name for name, state in checks.items() if not state.startswith("ok"))
    return problem_response(
        Problem(
            503,
            "Not ready",
            f"failing checks: {failing}",
            problem="not_ready",
            checks=checks,
            authentication=authentication,
        )
    )


@blueprint.get("/metrics")
def metrics() -> Response:
    return Response(generate_latest(services().metrics.registry), content_type=CONTENT_TYPE_LATEST)


@blueprint.get("/openapi.yaml")
def openapi() -> Response:
    return Response(services().contract.text, mimetype="application/yaml")


@blueprint.get("/docs")
def docs() -> Response:
    response = Response(render_docs(services().contract.document, static_url), mimetype="text/html")
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return response
