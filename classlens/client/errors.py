"""What the client raises: one :class:`ClassLensError`, carrying the service's problem details.

The service answers every error as ``application/problem+json`` (RFC 9457) with ``status``,
``title``, ``detail`` and a machine-readable ``problem`` name; the exception keeps all four, and the
whole body in :attr:`ClassLensError.body` (an audit's refusal names the ``file`` or the unknown
``labels`` there). Subclasses exist only where a caller acts differently: a missing resource, a key
that is refused, a limit to wait out, a job that ran and failed, a wait that ran out.
"""

from __future__ import annotations

from typing import Any


class ClassLensError(Exception):
    """An error from the service (or from reaching it): the problem's status, title, detail and name."""

    def __init__(
        self,
        title: str,
        detail: str,
        *,
        status: int | None = None,
        problem: str | None = None,
        body: dict[str, Any] | None = None,
    ):
        super().__init__(f"{status} {title}: {detail}" if status else f"{title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail
        self.problem = problem
        self.body: dict[str, Any] = dict(body or {})

    @property
    def client_error(self) -> bool:
        """True for a 4xx: the request itself has to change (a bad image, an unknown model or label)."""
        return self.status is not None and 400 <= self.status < 500


class NotFound(ClassLensError):
    """404: no such job, model, target, layer or figure."""


class Unauthorized(ClassLensError):
    """401 (no valid API key) or 403 (the key lacks the operation's scope)."""


class RateLimited(ClassLensError):
    """429 or 503 still answered after the bounded retries; ``retry_after`` is the service's last word, in seconds."""

    def __init__(self, title: str, detail: str, *, retry_after: float | None = None, **fields: Any):
        super().__init__(title, detail, **fields)
        self.retry_after = retry_after


class JobFailed(ClassLensError):
    """The job ran and ended ``failed``: ``title`` and ``detail`` are the job's error; ``job`` is the job itself."""

    def __init__(self, title: str, detail: str, *, job: Any, **fields: Any):
        super().__init__(title, detail, **fields)
        self.job = job


class WaitTimeout(ClassLensError, TimeoutError):
    """The job was not finished when the caller's timeout ran out (it goes on running on the service)."""

    def __init__(self, title: str, detail: str, *, job: Any, **fields: Any):
        super().__init__(title, detail, **fields)
        self.job = job


def error_for(status: int, body: dict[str, Any], retry_after: float | None) -> ClassLensError:
    """The exception for a problem answer (``body`` is the problem+json, or what could be read of the answer)."""
    title = str(body.get("title") or f"HTTP {status}")
    detail = str(body.get("detail") or "")
    fields: dict[str, Any] = {"status": status, "problem": body.get("problem"), "body": body}
    if status == 404:
        return NotFound(title, detail, **fields)
    if status in (401, 403):
        return Unauthorized(title, detail, **fields)
    if status in (429, 503):
        return RateLimited(title, detail, retry_after=retry_after, **fields)
    return ClassLensError(title, detail, **fields)
