"""The lens on the trained demo ViT: identifiability across blocks, and faithful projection maps."""

import numpy as np
import pytest
import torch
from PIL import Image

from classlens.bench.faithfulness import relevance_methods
from classlens.core import fashion_mnist
from classlens.core.contract import ExplainRequest
from worker.lens.faithfulness import evaluate_methods
from worker.model_loader import create_architecture
from worker.runtime import LoadedModel, load

IMAGES = 1000


@pytest.fixture(scope="module")
def fmnist(bundled_catalog):
    loaded = load(bundled_catalog.resolve("fmnist-vit"), torch.device("cpu"))
    images, labels = fashion_mnist.load("test")
    batch = loaded.preprocess([Image.fromarray(image, mode="L") for image in images[:IMAGES]])
    return loaded, batch, labels[:IMAGES]


def true_class_identifiability(loaded: LoadedModel, batch: torch.Tensor, labels: np.ndarray) -> np.ndarray:
    """Mean over images of the mean image-token identifiability of the true class, per layer 0..L."""
    from worker.lens.explain import explain

    per_image = []
    for start in range(0, len(batch), 250):
        chunk = batch[start : start + 250]
        by_class: dict[int, list[int]] = {}
        for offset, label in enumerate(labels[start : start + 250]):
            by_class.setdefault(int(label), []).append(offset)
        for label, offsets in by_class.items():
            request = ExplainRequest(targets=[label], sublayers=False)
            for result in explain(loaded.network, chunk[offsets], loaded.labels, request, loaded.ref):
                per_image.append(result.targets[0].residual.image_identifiability)
    return np.asarray(per_image).mean(axis=0)


@pytest.fixture(scope="module")
def identifiability_curve(fmnist):
    loaded, batch, labels = fmnist
    return true_class_identifiability(loaded, batch, labels)


@pytest.mark.slow
def test_true_class_identifiability_of_image_tokens_rises_across_blocks(identifiability_curve):
    blocks = identifiability_curve[1:]  # layer 0 is the embedding
    # Measured on fmnist-vit@2: 0.594 (embedding), then 0.674 0.773 0.818 0.839 0.858 0.861 after blocks 1-6.
    assert np.all(np.diff(blocks) > 0), identifiability_curve  # it rises block after block
    assert blocks[-1] > blocks[0] + 0.15, identifiability_curve


@pytest.mark.slow
def test_true_class_identifiability_of_image_tokens_exceeds_085_at_the_last_block(identifiability_curve):
    assert identifiability_curve[-1] > 0.85, identifiability_curve


@pytest.mark.slow
def test_random_initialised_copy_stays_at_chance(fmnist):
    loaded, batch, labels = fmnist
    torch.manual_seed(0)
    random_model = create_architecture(loaded.entry.manifest).eval()
    random_copy = LoadedModel(loaded.entry, random_model, loaded.labels, loaded.device)
    curve = true_class_identifiability(random_copy, batch, labels)
    chance = 1 - (len(loaded.labels) - 1) / 2 / len(loaded.labels)  # mean rank (C - 1) / 2: 0.55 for 10 classes
    assert np.all(np.abs(curve[1:] - chance) < 0.05), curve


@pytest.fixture(scope="module")
def faithfulness(fmnist):
    loaded, batch, labels = fmnist
    count = 500
    methods = relevance_methods(loaded.network, len(loaded.network.blocks), "logit", seed=0)
    chosen = {name: methods[name] for name in ("projection", "gradient", "random")}
    return evaluate_methods(loaded.network, batch[:count], torch.from_numpy(labels[:count]), chosen, batch_size=250)


def area(results, method, direction):
    return results[method][direction]["auc"]["accuracy"]


@pytest.mark.slow
def test_gradient_map_is_faithful_compared_with_random_order(faithfulness):
    # Measured on fmnist-vit@2, 500 images: gradient 0.499 / 0.756, random 0.773 / 0.772 (positive / negative AUC).
    assert area(faithfulness, "gradient", "positive") < area(faithfulness, "random", "positive") - 0.15
    # Keeping the least relevant tokens preserves far more than keeping the most relevant.
    assert area(faithfulness, "gradient", "negative") > area(faithfulness, "gradient", "positive") + 0.2


@pytest.mark.slow
def test_projection_map_is_faithful_compared_with_random_order(faithfulness):
    # Measured on fmnist-vit@2, 500 images: projection 0.515, random 0.773 (positive AUC).
    assert area(faithfulness, "projection", "positive") < area(faithfulness, "random", "positive") - 0.1
