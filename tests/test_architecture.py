"""The layout's promises: the API side never imports torch (DESIGN.md: the API image stays small)."""

import subprocess
import sys

import pytest

TORCH_FREE = [
    "service.app",
    "service.routes.explanations",
    "service.routes.audits",
    "service.routes.analyses",
    "classlens.cli",
    "classlens.contract",
    "classlens.jobs",
    "classlens.queue",
    "classlens.store",
    "model_store.catalog",
]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_imports_without_torch(module):
    code = (
        f"import sys, {module}; "
        "from service.app import create_app; "
        "bad = sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules); "
        "print(', '.join(bad)); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{module} pulled in: {result.stdout.strip()} {result.stderr.strip()}"
