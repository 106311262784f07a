"""``classlens keys create``: a new API key, printed once, and the key file's line for it.

The server keeps only the key's sha256 (see :mod:`service.auth`), so the key cannot be shown
again: whoever runs this hands it to the client and adds the printed line to
``CLASSLENS_API_KEYS_FILE`` (a YAML list; the line is a one-line entry of it).
"""

from __future__ import annotations

import json

import click


@click.group("keys")
def keys() -> None:
    """API keys for the HTTP API (authentication and scopes)."""


@keys.command("create")
@click.option("--id", "key_id", required=True, help="The key's name: it owns the key's jobs, and shows in refusals.")
@click.option(
    "--scopes", required=True, help="Comma-separated, some of: explain, audit, analyse, admin (models, /metrics)."
)
@click.option("--rate-limit", default=None, help="Requests allowed, e.g. 60/minute (default: CLASSLENS_RATE_LIMIT).")
def create_key(key_id: str, scopes: str, rate_limit: str | None) -> None:
    """Print a new random key (once: it is not stored) and the line to add to the key file."""
    from service.auth import KeyFileError, check_rate_limit, check_scopes, key_entry, new_key

    try:
        chosen = check_scopes(scopes.split(","))
        if rate_limit is not None:
            check_rate_limit(rate_limit)
    except KeyFileError as error:
        raise click.BadParameter(str(error)) from error
    if not key_id or len(key_id) > 100:
        raise click.BadParameter("--id must be a name of 1 to 100 characters")
    key = new_key()
    # The key and the advice go to stderr, the line alone to stdout: `classlens keys create ... >> keys.yaml`.
    click.echo(f"API key {key_id!r}, shown only now (clients send 'Authorization: Bearer <key>'): {key}", err=True)
    click.echo("Add this line to the file CLASSLENS_API_KEYS_FILE names (a YAML list):", err=True)
    # JSON is a one-line YAML mapping, and quotes any id safely.
    click.echo(f"- {json.dumps(key_entry(key_id, key, chosen, rate_limit))}")
