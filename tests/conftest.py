"""Shared fixtures. Importing :mod:`worker` applies the torchvision compatibility step before timm."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Under pytest-xdist (`make test-fast` runs two processes on two cores) each process keeps to
# one thread: two torch thread pools on two cores contend and make the tier slower, not faster.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import worker  # noqa: F401  (torchvision compatibility before any timm import)
from model_store.catalog import BUNDLED_ROOT, Catalog

DEMO_MODELS = ("fmnist-vit", "fmnist-resnet")

# The two tiers, marked here in one place. `make test` runs every test; `make test-fast` only those
# not marked `integration`: a test is an integration test when it needs a redis-server (the
# fixtures below), Celery worker processes, Chromium or the Fashion-MNIST dataset (the modules below).
INTEGRATION_FIXTURES = frozenset({"redis_url", "own_redis", "running_worker", "live_service", "browser"})
INTEGRATION_MODULES = frozenset(
    {
        "test_bench_service",
        "test_browser_pages",
        "test_cli_analyze",
        "test_cli_bench",
        "test_demo_models",
        "test_fashion_mnist",
        "test_faults",
        "test_lens_fmnist",
        "test_soak",
        "test_viewer",
    }
)


def is_integration(item: pytest.Item) -> bool:
    """Whether ``item`` needs the real parts: by module, by fixture, or by a ``redis`` parameter (a store fixture's)."""
    module = getattr(item, "module", None)
    name = module.__name__.rsplit(".", 1)[-1] if module is not None else ""
    callspec = getattr(item, "callspec", None)
    by_parameter = callspec is not None and "redis" in callspec.id.split("-")
    fixtures = set(getattr(item, "fixturenames", ()))
    return (
        name.startswith("test_service_")
        or name in INTEGRATION_MODULES
        or bool(INTEGRATION_FIXTURES & fixtures)
        or by_parameter
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if is_integration(item):
            item.add_marker(pytest.mark.integration)


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
