"""The manifest schema: what it accepts, and the clear errors for what it refuses."""

import copy

import pytest
import yaml

from model_store.manifest import Manifest, ManifestError, read_labels, read_manifest, version_key

GOOD = {
    "name": "my-vit",
    "version": "2",
    "framework": "timm",
    "architecture": "vit_small_patch16_224",
    "model_args": {"num_classes": 3},
    "input": {"height": 224, "width": 224, "channels": 3, "colour_mode": "RGB"},
    "preprocessing": {
        "resize": [256, 256],
        "interpolation": "bicubic",
        "crop": [224, 224],
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    },
    "labels": {"file": "labels.txt", "count": 3},
    "artifacts": {"weights": {"file": "model.safetensors", "format": "safetensors", "sha256": "a" * 64, "size": 10}},
    "metrics": [{"name": "top1_accuracy", "value": 0.9, "dataset": "val", "command": "python eval.py"}],
    "provenance": {"data": "ours", "recipe": "train.py", "seed": 1, "date": "2026-01-02", "licence": "MIT"},
}


def write(tmp_path, data):
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def changed(path: str, value):
    data = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return data


def test_good_manifest_round_trips(tmp_path):
    manifest = read_manifest(write(tmp_path, GOOD))
    assert manifest.reference == "my-vit@2"
    assert manifest.weights.size == 10
    assert manifest.preprocessing.crop == (224, 224)
    assert Manifest.model_validate(manifest.model_dump(mode="json")) == manifest


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("unexpected", 1, "unexpected: Extra inputs are not permitted"),
        ("name", "../etc", "name: String should match pattern"),
        ("framework", "keras", "framework: Input should be 'timm', 'transformers' or 'onnx'"),
        ("input.colour_mode", "L", "colour_mode L does not have 3 channel"),
        ("preprocessing.mean", [0.5], "need 3 value"),
        ("preprocessing.std", [0.2, 0.0, 0.2], "every std must be positive"),
        ("preprocessing.crop", [200, 200], "preprocessing ends at 200x200 but the input is 224x224"),
        ("artifacts.weights.sha256", "xyz", "sha256: String should match pattern"),
        ("artifacts.weights.file", "../model.safetensors", "plain name inside the version folder"),
        ("artifacts.weights.size", 0, "size: Input should be greater than 0"),
        ("artifacts", {}, "artifacts must include 'weights'"),
        ("labels.count", 1, "labels.count: Input should be greater than 1"),
        ("provenance", KeyError, "provenance: Field required"),
    ],
)
def test_bad_manifest_is_refused_with_the_field_named(tmp_path, path, value, message):
    with pytest.raises(ManifestError) as error:
        read_manifest(write(tmp_path, changed(path, value)))
    assert message in str(error.value)
    assert str(tmp_path) in str(error.value)


def test_not_a_mapping_and_broken_yaml(tmp_path):
    path = tmp_path / "manifest.yaml"
    path.write_text("- a list\n")
    with pytest.raises(ManifestError, match="a manifest is a mapping"):
        read_manifest(path)
    path.write_text("name: [unclosed\n")
    with pytest.raises(ManifestError, match="cannot read"):
        read_manifest(path)


def test_labels_count_and_uniqueness(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("cat\ndog\n\n")
    assert read_labels(path, 2) == ["cat", "dog"]
    with pytest.raises(ManifestError, match="2 labels, but the manifest says 3"):
        read_labels(path, 3)
    path.write_text("cat\ncat\n")
    with pytest.raises(ManifestError, match="unique"):
        read_labels(path, 2)


def test_versions_sort_numerically():
    assert sorted(["10", "9", "1.10", "1.2"], key=version_key) == ["1.2", "1.10", "9", "10"]
