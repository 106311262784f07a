"""The layout's promises: the folders are the layers, and the API side never imports torch.

The contracts themselves are import-linter's, in pyproject.toml (``make lint`` runs them); these
tests run them too, show that they fail when a layer is broken, and check at run time what a
static graph cannot see (an entry point that imports torch by a path the graph misses).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("classlens", "service", "worker", "model_store")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    assert LINT_IMPORTS.exists(), "import-linter is not installed (it is in the dev extra)"
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300, check=False
    )


def test_the_import_contracts_hold():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "4 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("classlens/core/store.py", "from service import app as _upward", "Layers"),
        ("model_store/catalog.py", "def _lazy():\n    import classlens.core.jobs", "Layers"),
        ("service/params.py", "def _lazy():\n    import worker.runtime", "Layers"),
        ("classlens/core/images.py", "def _lazy():\n    import torch", "never reach torch"),
        ("worker/lens/projection.py", "def _lazy():\n    import redis", "know nothing of Celery"),
        ("classlens/client/client.py", "def _lazy():\n    import flask", "client speaks HTTP only"),
    ],
)
def test_a_scratch_change_that_breaks_a_layer_fails_the_lint(tmp_path, module, line, contract):
    """An upward or forbidden import, even one inside a function, is caught."""
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "models"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n\n{line}\n")
    result = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0, result.stdout[-3000:]
    broken = [row for row in result.stdout.splitlines() if "BROKEN" in row or contract in row]
    assert any(contract in row for row in broken), result.stdout[-3000:]


TORCH_FREE = ["service.app", "classlens.cli", "classlens.cli.gpu_workers", "classlens.core.jobs", "model_store.catalog"]
HEAVY = ("torch", "timm", "torchvision")


@pytest.fixture(scope="module")
def pulled_in() -> dict[str, list[str]]:
    """What each torch-free module brings in, seen by one fresh interpreter.

    The modules are imported in turn and ``sys.modules`` is read after each, so a heavy
    import is charged to the first module that brings it; the last step is what the API
    and the GPU supervisor do at start-up (build the app, plan the GPUs).
    """
    code = (
        "import importlib, json, sys\n"
        f"heavy, seen = {HEAVY!r}, {{}}\n"
        f"for name in {TORCH_FREE!r}:\n"
        "    importlib.import_module(name)\n"
        "    seen[name] = sorted(m for m in heavy if m in sys.modules)\n"
        "from service.app import create_app\n"
        "from classlens.cli.gpu_workers import gpu_plan\n"
        "gpu_plan(None, {'CUDA_VISIBLE_DEVICES': '0,1'})\n"
        "seen['start-up'] = sorted(m for m in heavy if m in sys.modules)\n"
        "print(json.dumps(seen))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.mark.parametrize("module", [*TORCH_FREE, "start-up"])
def test_module_imports_without_torch(pulled_in, module):
    assert pulled_in[module] == [], f"{module} pulled in: {', '.join(pulled_in[module])}"
