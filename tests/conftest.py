"""Shared fixtures. Importing :mod:`worker` applies the torchvision compatibility step before timm."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import worker  # noqa: F401  (torchvision compatibility before any timm import)
from model_store.catalog import BUNDLED_ROOT, Catalog

DEMO_MODELS = ("fmnist-vit", "fmnist-resnet")


@pytest.fixture
def store_copy(tmp_path: Path) -> Path:
    """A writable copy of the bundled model store."""
    root = tmp_path / "store"
    shutil.copytree(BUNDLED_ROOT, root)
    return root


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """Invoke ``classlens`` in this process with its own data dir: models go to tmp/data/models."""
    from click.testing import CliRunner

    from classlens.cli import main

    monkeypatch.setenv("CLASSLENS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("CLASSLENS_MODEL_DIRS", raising=False)
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke


@pytest.fixture(scope="session")
def bundled_catalog() -> Catalog:
    catalog = Catalog([BUNDLED_ROOT])
    assert not catalog.errors, catalog.errors
    return catalog


# The service's real parts (redis-server, a tiny ViT, workers): see tests/service_fixtures.py.
from tests.service_fixtures import app, client, redis_url, store, tiny_model_root  # noqa: E402, F401
