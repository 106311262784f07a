"""The bundled demo models: recorded accuracy, re-measured accuracy, the PNG samples."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from classlens.core import fashion_mnist
from model_store.catalog import BUNDLED_ROOT, BUNDLED_SAMPLES
from tests.conftest import DEMO_MODELS
from worker.model_loader import load_model
from worker.preprocess import preprocess

SLICE = slice(0, 2000)  # a fixed slice of the 10,000 test images
SAMPLES = BUNDLED_SAMPLES


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_manifest_records_recipe_accuracy_of_at_least_90_percent(bundled_catalog, name):
    manifest = bundled_catalog.resolve(name).manifest
    [metric] = [m for m in manifest.metrics if m.name == "top1_accuracy"]
    assert metric.value >= 0.90
    assert "10,000" in metric.dataset
    assert name in metric.command
    assert manifest.weights.size < 20 * 2**20


@pytest.mark.slow
@pytest.mark.parametrize("name", DEMO_MODELS)
def test_accuracy_on_a_fixed_test_slice_stays_at_or_above_88_percent(bundled_catalog, name):
    entry = bundled_catalog.resolve(name)
    model = load_model(entry)
    images, labels = fashion_mnist.load("test")
    batch = torch.stack(
        [
            preprocess(Image.fromarray(image, mode="L"), entry.manifest.input, entry.manifest.preprocessing)
            for image in images[SLICE]
        ]
    )
    with torch.no_grad():
        predictions = model(batch).argmax(-1).numpy()
    accuracy = float(np.mean(predictions == labels[SLICE]))
    assert accuracy >= 0.88, f"{name}: {accuracy:.4f} on test[0:2000]"


def test_samples_are_labelled_pngs_that_the_vit_mostly_gets_right(bundled_catalog):
    rows = list(csv.DictReader((SAMPLES / "labels.csv").open()))
    assert len(rows) >= 10
    assert {int(r["label_index"]) for r in rows} == set(range(10))
    entry = bundled_catalog.resolve("fmnist-vit")
    model = load_model(entry)
    batch = torch.stack(
        [preprocess(Image.open(SAMPLES / r["file"]), entry.manifest.input, entry.manifest.preprocessing) for r in rows]
    )
    for row in rows:
        assert fashion_mnist.LABELS[int(row["label_index"])] == row["label"]
    with torch.no_grad():
        predicted = model(batch).argmax(-1).tolist()
    correct = sum(p == int(r["label_index"]) for p, r in zip(predicted, rows, strict=True))
    assert correct >= 0.8 * len(rows)


def test_every_bundled_version_was_trained_by_the_recipe_of_that_name_and_version():
    """The recipes in classlens/recipes reproduce what the committed training logs record."""
    import json
    from dataclasses import asdict

    from classlens.recipes.fashion_mnist import RECIPES

    logs = sorted(BUNDLED_ROOT.glob("*/*/training_log.json"))
    assert logs
    for log in logs:
        name, version = log.parent.parent.name, log.parent.name
        [recipe] = [r for key, r in RECIPES.items() if key.partition("@")[0] == name and r.version == version]
        assert json.loads(json.dumps(asdict(recipe))) == json.loads(log.read_text())["recipe"], log
