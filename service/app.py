"""The application factory: ``create_app(settings)`` builds one independent API.

Everything an app uses (store, queue, catalog, contract, metrics) is made here or passed
in, and kept in ``app.extensions["classlens"]``: nothing is configured at import time, and
tests can build several apps side by side with their own store and broker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from celery import Celery
from flask import Flask, Response, current_app, g, request

from classlens.core.jobs import JobStore
from classlens.core.queue import create_celery
from classlens.core.settings import Settings
from classlens.core.store import Store, open_store
from model_store.catalog import Catalog
from service.auth import Auth, auth_policy, authenticate
from service.errors import register_error_handlers
from service.metrics import Metrics
from service.openapi import SPEC_PATH, Contract


@dataclass
class Services:
    """The parts one app works with."""

    settings: Settings
    store: Store
    jobs: JobStore
    celery: Celery
    catalog: Catalog
    contract: Contract
    metrics: Metrics
    auth: Auth


def services() -> Services:
    """The current app's parts (inside a request or app context)."""
    found: Services = current_app.extensions["classlens"]
    return found


def create_app(
    settings: Settings | None = None,
    store: Store | None = None,
    celery: Celery | None = None,
    *,
    host: str = "127.0.0.1",
) -> Flask:
    """The API over ``store`` and ``celery`` (by default: those ``settings`` name), to be served on ``host``.

    ``host`` is where the WSGI server binds: off loopback, authentication is on even without keys
    (:func:`service.auth.auth_policy`), so a server other than ``classlens serve`` must say where it binds.
    """
    from service.quotas import install_rate_limits
    from service.routes import analyses, audits, explanations, kserve, models, operations, pages, references

    settings = settings or Settings()
    store = store or open_store(settings)
    celery = celery or create_celery(settings)
    # Refreshing itself, so that models added (by the CLI, by a worker for POST /v1/models) or disabled
    # while the API runs are served without a restart.
    catalog = Catalog.default(settings.model_roots, refresh_s=settings.catalog_refresh_s)
    jobs = JobStore(
        store,
        ttl_s=settings.result_ttl_s,
        inflight_ttl_s=settings.task_time_limit_s,
        max_waiters=settings.max_long_polls,  # long polls never take every server thread
    )
    parts = Services(
        settings,
        store,
        jobs,
        celery,
        catalog,
        Contract(settings.openapi_path or SPEC_PATH),
        Metrics(store, celery, catalog, settings),
        auth_policy(settings, host),
    )

    # No Flask static route: service.routes.pages serves every page's files (versioned) at /static/{name}.
    app = Flask("service", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes
    # An audit (analysis) sends up to audit_max_images (analysis_max_images) image parts and as many label
    # parts: Werkzeug's default (1000) is less.
    most_images = max(settings.audit_max_images, settings.analysis_max_images)
    app.config["MAX_FORM_PARTS"] = max(1000, 2 * most_images + 16)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["classlens"] = parts
    register_error_handlers(app)
    app.register_blueprint(explanations.blueprint)
    app.register_blueprint(audits.blueprint)
    app.register_blueprint(analyses.blueprint)
    app.register_blueprint(models.blueprint)
    app.register_blueprint(references.blueprint)
    app.register_blueprint(operations.blueprint)
    app.register_blueprint(pages.blueprint)
    app.register_blueprint(kserve.blueprint)

    # In this order: who is calling (401, 403), then how often (429), then what they sent (the contract),
    # so that a caller without a key learns nothing about the routes' parameters.
    @app.before_request
    def _authenticate() -> None:
        g.started = time.perf_counter()
        view = app.view_functions.get(request.endpoint) if request.endpoint else None
        authenticate(parts.auth, view)

    install_rate_limits(app, parts)

    @app.before_request
    def _validate() -> None:
        if request.endpoint == "models.add_model":  # weights are larger than any image or zip
            request.max_content_length = settings.max_model_upload_bytes
        parts.contract.validate(request)

    @app.after_request
    def _measure(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        parts.metrics.requests.labels(request.method, route, str(response.status_code)).inc()
        started = g.get("started")
        if started is not None:
            parts.metrics.latency.labels(request.method, route).observe(time.perf_counter() - started)
        return response

    return app
