"""Scopes that routes will require once the API authenticates its callers (it does not yet).

Routes that change what the service serves (adding and disabling models) are marked with
:func:`requires_scope` now, so that authentication, when it comes, has one place to enforce
them: the decorator already records the scope on the view and in :data:`REQUIRED_SCOPES`,
and ``openapi.yaml`` states the same scope on the operation (``x-required-scope``); a test
keeps the two in step. Until then the decorator lets every request through.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

# The scope of the model catalog's write routes (POST /v1/models, DELETE /v1/models/{name}@{version}).
MODELS_WRITE = "models:write"

# view function's qualified name -> the scope it requires
REQUIRED_SCOPES: dict[str, str] = {}


def requires_scope(scope: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Mark a view as needing ``scope``; today a no-op that records it (``view.required_scope``)."""

    def mark(view: Callable[P, R]) -> Callable[P, R]:
        @wraps(view)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            # Where authentication will check the caller's token for ``scope`` (401/403 problems).
            return view(*args, **kwargs)

        guarded.required_scope = scope  # type: ignore[attr-defined]
        REQUIRED_SCOPES[f"{view.__module__}.{view.__qualname__}"] = scope
        return guarded

    return mark


def required_scope(view: Callable[..., object]) -> str | None:
    """The scope ``view`` was marked with, if any."""
    scope = getattr(view, "required_scope", None)
    return scope if isinstance(scope, str) else None
