"""`classlens bench` and `classlens evaluate` run end to end (tiny settings) and write their records."""

import json
import subprocess
import sys


def run_cli(*args):
    # A fresh interpreter, as a user runs it: import order (torchvision compatibility before timm) included.
    return subprocess.run(
        [sys.executable, "-m", "classlens.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def test_bench_writes_ratios_for_every_method(tmp_path, bundled_catalog):
    out = tmp_path / "lens.json"
    result = run_cli(
        "bench", "--no-vit-small", "--no-vit-base", "--batch", "2", "--repeats", "1", "--no-ig", "--out", out
    )
    assert result.returncode == 0, result.stderr
    [record] = json.loads(out.read_text())["lens"]
    assert record["model"] == bundled_catalog.resolve("fmnist-vit").reference
    assert record["batch"] == 2
    assert set(record["methods"]) == {"forward", "explain", "gradient_map", "grad_cam", "onnx_forward", "onnx_explain"}
    assert set(record["onnxruntime"]) == {
        "explain_speedup_over_torch",
        "explain_to_onnx_forward",
        "forward_speedup_over_torch",
    }
    assert record["methods"]["forward"]["ratio_to_forward"] == 1.0
    assert all(m["median_ms"] > 0 for m in record["methods"].values())
    assert "explain" in result.stdout


def test_evaluate_writes_auc_per_method(tmp_path):
    out = tmp_path / "faithfulness.json"
    result = run_cli("evaluate", "--images", "16", "--method", "random", "--method", "gradient", "--out", out)
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    assert set(record["methods"]) == {"random", "gradient"}
    for method in record["methods"].values():
        for direction in ("positive", "negative"):
            assert 0.0 <= method[direction]["auc"]["accuracy"] <= 1.0
