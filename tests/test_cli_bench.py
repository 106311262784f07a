"""`classlens bench` and `classlens evaluate` run end to end (tiny settings) and write their records."""

import json
import subprocess
import sys


def run_cli(*args):
    # A fresh interpreter, as a user runs it: import order (torchvision compatibility before timm) included.
    return subprocess.run(
        [sys.executable, "-m", "classlens.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def test_bench_writes_cpu_time_ratios_at_each_thread_count(tmp_path, bundled_catalog):
    out = tmp_path / "lens.json"
    arguments = ("--no-vit-small", "--no-vit-base", "--batch", "2", "--rounds", "2", "--no-ig", "--out", out)
    result = run_cli("bench", *arguments)
    assert result.returncode == 0, result.stderr
    [record] = json.loads(out.read_text())["lens"]
    assert record["model"] == bundled_catalog.resolve("fmnist-vit").reference
    assert record["batch"] == 2
    methods = {"forward", "explain", "floor", "gradient_map", "grad_cam", "onnx_forward", "onnx_explain"}
    assert set(record["methods"]) == methods
    # The explanation's work beyond its class products, per thread count (a figure, not a bound).
    assert set(record["explain_above_floor"]) == {"1", "2"}
    for threads, above in record["explain_above_floor"].items():
        assert above["min"] <= above["median"] <= above["max"], threads
    for name, method in record["methods"].items():
        assert set(method["threads"]) == {"1", "2"}, name
        for at in method["threads"].values():
            assert at["ratio"]["min"] <= at["ratio"]["median"] <= at["ratio"]["max"]
            assert at["cpu_ms"] > 0
            assert at["wall_ms"] > 0
            assert 0 <= at["loaded_rounds"] <= at["rounds"]
    assert all(
        at["ratio"] == {"min": 1.0, "median": 1.0, "max": 1.0}
        for at in record["methods"]["forward"]["threads"].values()
    )
    assert record["methods"]["explain"]["threads"]["1"]["rounds"] == 2
    # Two rounds at each of two thread counts, alternating, each starting one method later.
    rounds = record["rounds"]
    assert [r["threads"] for r in rounds] == [1, 2, 1, 2]
    assert rounds[0]["order"][1:] + rounds[0]["order"][:1] == rounds[2]["order"]
    assert all(r["others_share"] >= 0 and isinstance(r["loaded"], bool) for r in rounds)
    assert set(record["onnxruntime"]["1"]) == {
        "explain_speedup_over_torch",
        "explain_to_onnx_forward",
        "forward_speedup_over_torch",
    }
    assert "x forward (CPU)" in result.stdout


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


def test_bench_memory_writes_rss_over_explanations_and_peaks_over_images(tmp_path):
    out = tmp_path / "memory.json"
    sizes = ("--img-size", "32", "--analysis-img-size", "32", "--batch", "4")
    result = run_cli("bench-memory", "--explanations", "6", "--every", "3", "--images", "8", *sizes, "--out", out)
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    figures = record["explain_rss"]
    assert [sample["explanations"] for sample in figures["samples"]] == [3, 6]
    assert figures["cpu_ms_per_explanation"] > 0
    assert figures["base_rss_mib"] > 0
    assert figures["forward_peak_mib"] >= 0
    assert figures["workspace_mib"] > 0
    assert set(record["analysis_peak"]) == {"forward", "cka", "attention-distance", "skip-ratio"}
    for rows in record["analysis_peak"].values():
        [row] = rows
        assert row["images"] == 8
        assert row["peak_extra_mib"] >= row["one_batch_peak_mib"] >= 0
    assert "cka peak extra MiB" in result.stdout


def test_bench_with_integrated_gradients_says_what_to_install_when_captum_is_missing(monkeypatch):
    import importlib.util

    from click.testing import CliRunner

    from classlens.cli import main

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "captum" else find_spec(name, *a))
    result = CliRunner().invoke(main, ["bench", "--no-vit-small", "--no-vit-base", "--no-analyses"])
    assert result.exit_code == 1
    assert "needs Captum" in result.output
    assert "--no-ig" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
