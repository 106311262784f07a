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
    # Both protocols by default, each table saying which it is; the paper's scores every n = 1..N.
    assert set(record["protocols"]) == {"project", "paper"}
    assert set(record["paper"]) == {"random", "gradient"}
    assert record["paper"]["random"]["negative"]["kept"] == list(range(1, 50))
    assert "protocol: project" in result.stdout
    assert "protocol: paper" in result.stdout


def test_evaluate_one_protocol_with_chefer(tmp_path):
    out = tmp_path / "faithfulness.json"
    arguments = ("--images", "4", "--method", "chefer", "--protocol", "paper", "--out", out)
    result = run_cli("evaluate", *arguments)
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    assert set(record["protocols"]) == {"paper"}
    assert "methods" not in record
    scores = record["paper"]["chefer"]["positive"]["auc"]
    assert 0.0 <= scores["accuracy"] <= 1.0
    assert "protocol: project" not in result.stdout
