"""The analyses benchmark at toy size: every method timed in one run, ratios and memory per image count."""

import json

from click.testing import CliRunner

from classlens.cli import main


def test_analyses_only_writes_ratios_and_memory_per_image_count(tmp_path):
    out = tmp_path / "analyses.json"
    lens = tmp_path / "lens.json"
    result = CliRunner().invoke(
        main,
        [
            "bench",
            "--analyses-only",
            "--analyses-images",
            "8",
            "--analyses-images",
            "12",
            "--analyses-batch",
            "4",
            "--analyses-architecture",
            "vit_tiny_patch16_224",
            "--analyses-img-size",
            "32",
            "--analyses-out",
            str(out),
            "--out",
            str(lens),
        ],
    )
    assert result.exit_code == 0, result.output
    assert not lens.exists()  # the lens part did not run
    record = json.loads(out.read_text())
    assert record["model"] == "vit_tiny_patch16_224-random@32"
    assert [r["images"] for r in record["analyses"]] == [8, 12]
    for entry in record["analyses"]:
        assert set(entry["methods"]) == {"forward", "cka", "attention_distance"}
        assert entry["methods"]["forward"]["threads"]["1"]["ratio"]["median"] == 1.0
        for method in entry["methods"].values():
            assert method["peak_extra_mib"] >= 0
            assert set(method["threads"]) == {"1", "2"}
            assert all(at["cpu_ms"] > 0 for at in method["threads"].values())
    summary = record["summary"]
    assert summary["cka_target"] == 1.5
    assert set(summary["peak_extra_mib_by_images"]) == {"8", "12"}
    assert set(summary["cka_ratio_to_forward"]) == {"1", "2"}
    assert summary["cka_within_target"] == all(ratio <= 1.5 for ratio in summary["cka_ratio_to_forward"].values())
    assert "CKA / forward" in result.output


def test_an_unknown_architecture_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(
        main, ["bench", "--analyses-only", "--analyses-architecture", "resnet18", "--analyses-out", str(tmp_path / "a")]
    )
    assert result.exit_code == 1
    assert "cannot build resnet18" in result.output
