"""What several commands share: the catalog from settings, and model references resolved with clear errors."""

from __future__ import annotations

import click

from classlens.core.settings import Settings
from model_store.catalog import Catalog, ModelEntry, ModelNotFoundError


def open_catalog(settings: Settings) -> Catalog:
    """The catalog over the user's roots and the bundled models; broken manifests are warned about, not fatal."""
    catalog = Catalog.default(settings.model_roots)
    for problem in catalog.errors:
        click.secho(f"warning: skipped {problem}", fg="yellow", err=True)
    return catalog


def resolve(catalog: Catalog, reference: str) -> ModelEntry:
    try:
        return catalog.resolve(reference)
    except ModelNotFoundError as error:
        raise click.ClickException(str(error)) from error
