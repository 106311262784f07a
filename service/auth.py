"""Who may call the API: API keys (bearer tokens) with scopes, and which key owns which job.

A key is a random token (:func:`new_key`, 256 bits) that the server knows only by its sha256
(:func:`hash_key`). A fast hash is enough, and a slow one (bcrypt, argon2) would buy nothing:
slow hashes protect *guessable* secrets such as passwords from an attacker who stole the hashes,
but no amount of guessing finds a 256-bit random preimage, while a slow hash would cost every
request tens of milliseconds. The digest is also what the key file is looked up by, so a check
is one dictionary lookup, not a comparison with every key.

Keys come from a YAML (or JSON) file, ``CLASSLENS_API_KEYS_FILE``, or the same text in
``CLASSLENS_API_KEYS`` (for containers whose secrets arrive as variables): a list of entries::

    - {id: alice, sha256: <64 hex digits>, scopes: [explain, audit], rate_limit: 60/minute, max_in_flight: 8}

``classlens keys create`` prints a fresh key once, and the line to add. ``rate_limit`` and
``max_in_flight`` are optional (``CLASSLENS_RATE_LIMIT`` and ``CLASSLENS_MAX_JOBS_IN_FLIGHT``
otherwise).

Authentication is on whenever keys are configured or the API is bound to anything but a loopback
address; it is off only in the embedded default (``classlens serve`` on 127.0.0.1 without keys),
where every caller is someone on this machine, and then :func:`auth_policy` says so loudly (a
warning at start-up, and ``authentication`` in ``/readyz``). On with no key configured, every
protected route refuses: failing closed beats an open service on a public address.

Scopes: one per kind of work (:data:`EXPLAIN`, :data:`AUDIT`, :data:`ANALYSE`) and :data:`ADMIN`
for the catalog's write routes, the registration jobs and ``/metrics``. :func:`scope_for` is the
one definition of what each route requires; ``openapi.yaml`` states the same per operation
(``security``) and a test keeps the two in step. Routes in :data:`PUBLIC_ENDPOINTS` need no key.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import wraps
from typing import Any, ParamSpec, TypeVar

import yaml
from flask import g, request

from classlens.core.contract import Job
from classlens.core.settings import Settings
from service.errors import Problem

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

EXPLAIN = "explain"
AUDIT = "audit"
ANALYSE = "analyse"
ADMIN = "admin"
SCOPES = (EXPLAIN, AUDIT, ANALYSE, ADMIN)
# The catalog's write routes (POST /v1/models, DELETE /v1/models/{name}@{version}) need the admin scope;
# the old name is kept so that code marked with it keeps meaning the same thing.
MODELS_WRITE = ADMIN

KEY_PREFIX = "clk_"

# Answer without a key: probes (a load balancer has no key) and the contract itself.
# The pages and their static files hold no data (their script calls the API, which asks for a key itself).
PUBLIC_ENDPOINTS = frozenset(
    {
        "operations.livez",
        "operations.readyz",
        "operations.openapi",
        "operations.docs",
        "pages.ui",
        "pages.sample",
        "pages.view",
        "pages.audit",
        "pages.static_file",
    }
)
# Every route of a blueprint needs its kind's scope ...
BLUEPRINT_SCOPES: Mapping[str, str] = {"explanations": EXPLAIN, "audits": AUDIT, "analyses": ANALYSE}
# ... and these routes need a scope of their own; other routes (reading the catalog) need any valid key.
ENDPOINT_SCOPES: Mapping[str, str] = {"operations.metrics": ADMIN, "models.get_model_job": ADMIN}

# view function's qualified name -> the scope it was marked with (requires_scope)
REQUIRED_SCOPES: dict[str, str] = {}


class KeyFileError(ValueError):
    """The configured keys cannot be used; the message says which entry and why."""


@dataclass(frozen=True)
class ApiKey:
    """One configured key, as the server knows it: its id (the owner of its jobs), digest, scopes and limits."""

    id: str
    sha256: str
    scopes: frozenset[str]
    rate_limit: str | None = None
    max_in_flight: int | None = None


@dataclass(frozen=True)
class Auth:
    """Whether the API authenticates, the keys it accepts (by digest), and why it is on or off (for people)."""

    enabled: bool
    keys: Mapping[str, ApiKey] = field(default_factory=dict)
    reason: str = ""

    def find(self, token: str) -> ApiKey | None:
        return self.keys.get(hash_key(token))


def new_key() -> str:
    """A fresh key: 32 random bytes, URL-safe, with a prefix that makes a leaked one easy to recognise."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_entry(key_id: str, key: str, scopes: Iterable[str], rate_limit: str | None = None) -> dict[str, Any]:
    """The key file's entry for ``key`` (its digest, never the key)."""
    entry: dict[str, Any] = {"id": key_id, "sha256": hash_key(key), "scopes": list(scopes)}
    if rate_limit:
        entry["rate_limit"] = rate_limit
    return entry


def check_scopes(scopes: Iterable[str]) -> list[str]:
    chosen = [scope.strip() for scope in scopes if scope.strip()]
    unknown = sorted(set(chosen) - set(SCOPES))
    if unknown or not chosen:
        raise KeyFileError(f"scopes must be some of {', '.join(SCOPES)} (got {', '.join(unknown) or 'none'})")
    return chosen


def check_rate_limit(text: str) -> str:
    from limits import parse_many

    try:
        parse_many(text)
    except ValueError as error:
        raise KeyFileError(f"rate_limit {text!r} is not a limit such as '60/minute' or '10/second;500/hour'") from error
    return text


def _entry(raw: object, where: str) -> ApiKey:
    if not isinstance(raw, dict):
        raise KeyFileError(f"{where}: each key is a mapping with id, sha256 and scopes")
    unknown = sorted(set(raw) - {"id", "sha256", "scopes", "rate_limit", "max_in_flight"})
    if unknown:
        raise KeyFileError(f"{where}: unknown fields {', '.join(unknown)}")
    key_id, digest, scopes = raw.get("id"), raw.get("sha256"), raw.get("scopes")
    if not isinstance(key_id, str) or not key_id or len(key_id) > 100:
        raise KeyFileError(f"{where}: id must be a name of 1 to 100 characters")
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise KeyFileError(f"{where} ({key_id}): sha256 must be 64 lower-case hex digits (classlens keys create)")
    if not isinstance(scopes, list) or not all(isinstance(scope, str) for scope in scopes):
        raise KeyFileError(f"{where} ({key_id}): scopes must be a list")
    rate_limit, in_flight = raw.get("rate_limit"), raw.get("max_in_flight")
    if rate_limit is not None and not isinstance(rate_limit, str):
        raise KeyFileError(f"{where} ({key_id}): rate_limit must be text such as '60/minute'")
    if in_flight is not None and (not isinstance(in_flight, int) or isinstance(in_flight, bool) or in_flight < 1):
        raise KeyFileError(f"{where} ({key_id}): max_in_flight must be a positive integer")
    try:
        chosen = check_scopes(scopes)
        if rate_limit is not None:
            check_rate_limit(rate_limit)
    except KeyFileError as error:
        raise KeyFileError(f"{where} ({key_id}): {error}") from error
    return ApiKey(key_id, digest, frozenset(chosen), rate_limit, in_flight)


def parse_keys(text: str, source: str) -> list[ApiKey]:
    """The entries of a key file's text (YAML; JSON is YAML too); an empty file has none."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise KeyFileError(f"{source} is not YAML or JSON: {error}") from error
    if document is None:
        return []
    if not isinstance(document, list):
        raise KeyFileError(f"{source} must be a list of keys (each '- {{id: ..., sha256: ..., scopes: [...]}}')")
    return [_entry(raw, f"{source}, entry {number}") for number, raw in enumerate(document, 1)]


def load_keys(settings: Settings) -> dict[str, ApiKey]:
    """Every configured key by digest: ``CLASSLENS_API_KEYS_FILE`` and ``CLASSLENS_API_KEYS`` together."""
    found: list[ApiKey] = []
    if settings.api_keys_file is not None:
        try:
            text = settings.api_keys_file.read_text(encoding="utf-8")
        except OSError as error:
            raise KeyFileError(f"cannot read CLASSLENS_API_KEYS_FILE {settings.api_keys_file}: {error}") from error
        found += parse_keys(text, str(settings.api_keys_file))
    if settings.api_keys:
        found += parse_keys(settings.api_keys, "CLASSLENS_API_KEYS")
    ids = [key.id for key in found]
    repeated = sorted({key_id for key_id in ids if ids.count(key_id) > 1})
    if repeated:
        raise KeyFileError(f"key ids must be unique (they own jobs): {', '.join(repeated)} appear more than once")
    return {key.sha256: key for key in found}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def auth_policy(settings: Settings, host: str) -> Auth:
    """Authentication for an API bound to ``host``: on with keys or off loopback, off only on localhost without keys."""
    keys = load_keys(settings)
    if keys:
        return Auth(True, keys, f"on: {len(keys)} API key(s) configured")
    if not is_loopback(host):
        reason = (
            f"on: bound to {host} without any API key configured, so every protected route answers 401; "
            "create keys with `classlens keys create` and list them in CLASSLENS_API_KEYS_FILE"
        )
        log.warning("authentication %s", reason)
        return Auth(True, {}, reason)
    reason = (
        f"OFF: bound to {host} and no API key configured, so anyone who can reach this port on this machine "
        "may use every route; configure CLASSLENS_API_KEYS_FILE to turn it on"
    )
    log.warning("authentication is %s", reason)
    return Auth(False, {}, reason)


# -- what each route requires --------------------------------------------------------------------------


def requires_scope(scope: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Mark a view as needing ``scope`` (``view.required_scope``); :func:`scope_for` reads the mark."""

    def mark(view: Callable[P, R]) -> Callable[P, R]:
        @wraps(view)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            # The check itself happens before any view runs (authenticate), so this wrapper only carries the mark.
            return view(*args, **kwargs)

        guarded.required_scope = scope  # type: ignore[attr-defined]
        REQUIRED_SCOPES[f"{view.__module__}.{view.__qualname__}"] = scope
        return guarded

    return mark


def required_scope(view: Callable[..., object]) -> str | None:
    """The scope ``view`` was marked with, if any."""
    scope = getattr(view, "required_scope", None)
    return scope if isinstance(scope, str) else None


def scope_for(endpoint: str, view: Callable[..., object]) -> str | None:
    """The scope a route requires (None: any valid key): its mark, else its own entry, else its blueprint's."""
    marked = required_scope(view)
    if marked is not None:
        return marked
    if endpoint in ENDPOINT_SCOPES:
        return ENDPOINT_SCOPES[endpoint]
    return BLUEPRINT_SCOPES.get(endpoint.partition(".")[0])


# -- per request ------------------------------------------------------------------------------------------

_CHALLENGE = 'Bearer realm="classlens"'


def _bearer_token() -> str | None:
    header = request.headers.get("Authorization", "")
    kind, _, token = header.partition(" ")
    return token.strip() if kind.lower() == "bearer" and token.strip() else None


def authenticate(auth: Auth, view: Callable[..., object] | None) -> None:
    """Before any view: 401 without a valid key, 403 without the route's scope; the key is kept in ``g``."""
    g.api_key = None
    endpoint = request.endpoint
    if not auth.enabled or endpoint is None or view is None or endpoint in PUBLIC_ENDPOINTS:
        return
    token = _bearer_token()
    if token is None:
        raise Problem(
            401,
            "Authentication required",
            "send an API key as 'Authorization: Bearer <key>' (an operator creates keys with classlens keys create)",
            problem="unauthenticated",
            headers={"WWW-Authenticate": _CHALLENGE},
        )
    key = auth.find(token)
    if key is None:
        raise Problem(
            401,
            "Invalid API key",
            "the API key is not known to this server; check it, or ask for a new one",
            problem="unauthenticated",
            headers={"WWW-Authenticate": f'{_CHALLENGE}, error="invalid_token"'},
        )
    g.api_key = key
    scope = scope_for(endpoint, view)
    if scope is not None and scope not in key.scopes:
        raise Problem(
            403,
            "Scope missing",
            f"this route needs the {scope!r} scope; key {key.id!r} has {', '.join(sorted(key.scopes))}",
            problem="forbidden",
            required_scope=scope,
        )


def caller() -> ApiKey | None:
    """The current request's key (None when authentication is off or the route is public)."""
    found = g.get("api_key")
    return found if isinstance(found, ApiKey) else None


def caller_id() -> str | None:
    """The owner of the jobs the current request creates (None: authentication is off)."""
    key = caller()
    return key.id if key is not None else None


def may_see(job: Job, auth: Auth) -> bool:
    """A key sees only the jobs it owns; with authentication off there is one (trusted) caller."""
    return not auth.enabled or job.owner == caller_id()
