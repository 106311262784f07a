"""Every error as ``application/problem+json`` (RFC 9457), from one table of domain exceptions.

Handlers raise domain exceptions (``RequestError``, ``ImageError``, ``ModelNotFoundError``,
``StoreError``...), or a :class:`Problem` for what only HTTP knows (a missing multipart part);
:func:`problem_for` turns any of them into a status and a body, so the HTTP meaning of each
failure is decided here and nowhere else. Unexpected exceptions become a 500 whose detail
leaks nothing; they are logged with their traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, json
from flask_limiter.errors import RateLimitExceeded
from kombu.exceptions import KombuError, OperationalError
from redis.exceptions import RedisError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from classlens.core.images import ImageError
from classlens.core.requests import RequestError
from classlens.core.store import StoreError
from model_store.catalog import ModelDisabledError, ModelNotFoundError

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


class Problem(Exception):
    """An error response: status, a short title, a detail saying what to change, and a machine name."""

    def __init__(
        self, status: int, title: str, detail: str, *, problem: str, headers: dict[str, str] | None = None, **extra: Any
    ):
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.problem = problem
        # Response headers the refusal needs (WWW-Authenticate with a 401, Retry-After with a 429).
        self.headers = dict(headers or {})
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {
            "type": f"urn:classlens:problem:{self.problem}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "problem": self.problem,
            **self.extra,
        }


_IMAGE_PROBLEMS: dict[str, tuple[int, str]] = {
    "empty": (422, "Empty image"),
    "unreadable": (422, "Unreadable image"),
    "truncated": (422, "Truncated image"),
    "unsupported_format": (415, "Unsupported image type"),
    "too_many_pixels": (422, "Too many pixels"),
}


def _image(error: ImageError) -> Problem:
    status, title = _IMAGE_PROBLEMS.get(error.problem, (422, "Unusable image"))
    return Problem(status, title, error.detail, problem=error.problem)


# A request problem is a 422 (understood, not honoured) unless it is one of these.
_REQUEST_STATUSES: dict[str, int] = {
    "unknown_target": 404,
    "no_map": 404,
    "no_reference": 404,
    "unknown_image": 404,
    "not_ready": 409,
    "model_exists": 409,
    "store_read_only": 409,
    "other_model": 409,
    "no_signals": 409,
    "expired": 410,
    "unsupported_weights": 415,
}


def _request(error: RequestError) -> Problem:
    status = _REQUEST_STATUSES.get(error.problem, 422)
    return Problem(status, error.title, error.detail, problem=error.problem, **error.extra)


def _rate_limited(error: RateLimitExceeded) -> Problem:
    # Flask-Limiter adds Retry-After (seconds until the window resets) to this response itself.
    return Problem(
        429,
        "Rate limit exceeded",
        f"this API key may make {error.limit.limit} requests; wait as long as Retry-After says, then try again",
        problem="rate_limited",
    )


def _http(error: HTTPException) -> Problem:
    status = error.code or 500
    if isinstance(error, RequestEntityTooLarge):
        return Problem(
            413, "Request too large", "the request body is larger than this server accepts", problem="too_large"
        )
    name = (error.name or "error").lower().replace(" ", "_")
    return Problem(status, error.name or "Error", error.description or "", problem=name)


# The store and the broker are tried again for a few seconds before a request fails; a client that
# waits this long before its next try usually finds them back.
UNAVAILABLE_RETRY_S = 5


def _unavailable(title: str, detail: str, problem: str) -> Problem:
    return Problem(
        503,
        title,
        f"{detail}; try again in {UNAVAILABLE_RETRY_S} s",
        problem=problem,
        headers={"Retry-After": str(UNAVAILABLE_RETRY_S)},
    )


# The table: domain exception -> Problem. The first matching row wins, so subclasses come first.
PROBLEM_TABLE: list[tuple[type[BaseException], Callable[[Any], Problem]]] = [
    (Problem, lambda error: error),
    (RequestError, _request),
    (ImageError, _image),
    # Asking for a disabled version by itself (GET /v1/models/{name}@{version}): it is gone on purpose.
    (ModelDisabledError, lambda error: Problem(410, "Model disabled", str(error), problem="model_disabled")),
    (ModelNotFoundError, lambda error: Problem(404, "Unknown model", str(error), problem="unknown_model")),
    (StoreError, lambda error: _unavailable("Store unavailable", "the job store cannot be reached", "store")),
    # Only the rate limiter talks to Redis directly (the store wraps its errors): its count lives there.
    (RedisError, lambda error: _unavailable("Store unavailable", "the job store cannot be reached", "store")),
    (OperationalError, lambda error: _unavailable("Queue unavailable", "the job queue cannot be reached", "queue")),
    (KombuError, lambda error: _unavailable("Queue unavailable", "the job queue refused the job", "queue")),
    (RateLimitExceeded, _rate_limited),
    (HTTPException, _http),
]


def problem_for(error: BaseException) -> Problem:
    for kind, convert in PROBLEM_TABLE:
        if isinstance(error, kind):
            return convert(error)
    log.error("unhandled error", exc_info=error)
    return Problem(500, "Internal error", "the server failed unexpectedly; the error was logged", problem="internal")


def problem_response(problem: Problem) -> Response:
    response = Response(json.dumps(problem.body()), status=problem.status, mimetype=PROBLEM_JSON)
    response.headers.update(problem.headers)
    return response


def register_error_handlers(app: Flask) -> None:
    """Route every exception through :func:`problem_for`."""

    @app.errorhandler(Exception)
    def _handle(error: Exception) -> Response:
        response = problem_response(problem_for(error))
        allowed = getattr(error, "valid_methods", None)
        if allowed:  # a 405 says what is allowed
            response.headers["Allow"] = ", ".join(allowed)
        return response
