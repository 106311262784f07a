"""token-probes, gradient-parts and significance, through run_analysis and against re-implementations here.

A tiny random ViT (2 blocks, 7x7 tokens, 10 classes; weights from seed 1, so that the
random-initialised copy the significance kind draws from seed 0 differs from it) and a dozen of
the bundled Fashion-MNIST samples.
"""

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import stats

from classlens.core.contract import AnalysisRequest
from model_store.catalog import BUNDLED_SAMPLES, Catalog
from tests.service_fixtures import TINY_MODEL, add_tiny_vit
from worker.analyses.job import random_copy
from worker.analyses.memories import key_value_agreement, memory_scores
from worker.analyses.run import AnalysisError, run_analysis
from worker.analyses.significance import paired_tests
from worker.analyses.token_probes import few_shot_rows, layer_groups
from worker.lens.gradient import gradient_parts, gradient_relevance
from worker.lens.projection import ClassProjection
from worker.random_models import random_vit
from worker.runtime import load

COUNT = 12
PAIRS = 14  # significance: over 13 pairs with ties, scipy's "auto" takes the normal approximation, not 2^n sign flips


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = add_tiny_vit(tmp_path_factory.mktemp("tiny-kinds"), seed=1)
    return load(Catalog([root]).resolve(f"{TINY_MODEL}@1"), torch.device("cpu"))


def bundled_samples(count):
    with (BUNDLED_SAMPLES / "labels.csv").open() as stream:
        rows = list(csv.DictReader(stream))[:count]
    images = [Image.open(BUNDLED_SAMPLES / row["file"]).convert("L") for row in rows]
    return images, np.array([int(row["label_index"]) for row in rows])


@pytest.fixture(scope="module")
def samples():
    return bundled_samples(COUNT)


def analyse(kind, tiny, samples, labels=True, **fields):
    images, truth = samples
    calls = []
    outcome = run_analysis(
        AnalysisRequest(kind=kind, batch_size=4, **fields),
        [tiny],
        images,
        truth if labels else None,
        lambda done, total: calls.append((done, total)),
    )
    json.dumps(outcome.data, allow_nan=False)
    assert calls[-1][0] == calls[-1][1] > 0, calls
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    return outcome


def block_outputs(model, images):
    """``[B, L + 1, T, D]``: the input of the first block and every block's output, by forward hooks here."""
    seen = []
    handles = [model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))]
    handles += [block.register_forward_hook(lambda module, args, out: seen.append(out)) for block in model.blocks]
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    return torch.stack(seen, dim=1)


# -- gradient-parts ---------------------------------------------------------------------------------


def parts_by_hand(model, images, targets):
    """Block b's, head h's -d l_b / d A_b[h, CLS, j], one block at a time, attention written out here."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    prefix = model.num_prefix_tokens
    parts = []
    for block in model.blocks:
        x = x.detach()
        attention = block.attn
        batch, tokens, width = x.shape
        heads = attention.num_heads
        qkv = attention.qkv(block.norm1(x)).reshape(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        probabilities = ((q * attention.scale) @ k.transpose(-2, -1)).softmax(dim=-1).detach().requires_grad_(True)
        mixed = (probabilities @ v).transpose(1, 2).reshape(batch, tokens, width)
        a = block.ls1(attention.proj(mixed))
        loss = F.cross_entropy(model.head(model.norm(a[:, 0])), targets, reduction="sum")
        (grad,) = torch.autograd.grad(loss, probabilities)
        parts.append(-grad[:, :, 0, prefix:])
        x = x + a
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return torch.stack(parts, dim=1)


def test_gradient_parts_are_the_terms_of_the_gradient_map():
    model = random_vit(
        "vit_tiny_patch16_224", seed=3, img_size=32, patch_size=8, depth=3, embed_dim=48, num_heads=3, num_classes=7
    )
    images, targets = torch.randn(3, 3, 32, 32), torch.tensor([1, 4, 6])
    projection = ClassProjection(model)
    parts = gradient_parts(images, targets, projection)
    assert parts.shape == (3, 3, 3, 16)
    assert torch.allclose(parts, parts_by_hand(model, images, targets), atol=1e-5)
    whole = gradient_relevance(images, targets[:, None], projection)[:, 0]
    assert torch.allclose(parts.sum(dim=(1, 2)), whole, atol=1e-5)
    assert whole.abs().max() > 1e-3


def test_gradient_parts_of_a_gap_model_sum_to_its_map():
    model = random_vit(
        "vit_tiny_patch16_224",
        seed=4,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=32,
        num_heads=2,
        num_classes=5,
        global_pool="avg",
        class_token=False,
    )
    images, targets = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    projection = ClassProjection(model)
    whole = gradient_relevance(images, targets[:, None], projection)[:, 0]
    assert torch.allclose(gradient_parts(images, targets, projection).sum(dim=(1, 2)), whole, atol=1e-5)


def test_gradient_parts_kind(tiny, samples):
    outcome = analyse("gradient-parts", tiny, samples, layer=1)
    assert set(outcome.figures) == {"gradient_parts_blocks", "gradient_parts_heads"}
    assert all(png.startswith(b"\x89PNG") for png in outcome.figures.values())
    data = outcome.data
    images, truth = samples
    expected = parts_by_hand(tiny.network, tiny.preprocess(images), torch.as_tensor(truth)).mean(dim=0)  # [L, H, N]
    assert np.allclose(data["parts"], expected.reshape(2, 2, 7, 7).numpy(), atol=1e-5)
    assert np.allclose(np.sum(data["block_maps"], axis=0), data["map"], atol=1e-5)
    assert np.allclose(data["head_maps"], np.asarray(data["parts"])[0], atol=1e-6)  # block 1 asked for
    assert data["head_block"] == 1
    assert np.isclose(np.sum(data["head_share"]), 1.0, atol=1e-3)
    assert data["targets"] == "true class"


# -- token-probes -------------------------------------------------------------------------------------


def ridge_by_hand(train, train_labels, test, classes, ridge=1.0):
    """Scores ``[test, C]`` of the closed-form ridge W = (X^T X + lambda I)^-1 X^T Y on centred X and Y."""
    x, y = train.astype(np.float64), np.eye(classes)[train_labels]
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - x_mean, y - y_mean
    weights = np.linalg.solve(xc.T @ xc + ridge * np.eye(x.shape[1]), xc.T @ yc)
    return (test.astype(np.float64) - x_mean) @ weights + y_mean


def test_token_probes_against_a_ridge_written_here(tiny, samples):
    outcome = analyse("token-probes", tiny, samples)
    assert set(outcome.figures) == {"token_probes", "token_probes_maps", "token_probes_faithfulness"}
    assert all(png.startswith(b"\x89PNG") for png in outcome.figures.values())
    data = outcome.data
    images, truth = samples
    model = tiny.network
    streams = block_outputs(model, tiny.preprocess(images)).numpy()  # [12, 3, 50, 64]
    test = np.arange(COUNT) % 4 == 3
    assert data["split"] == {"rule": data["split"]["rule"], "train": 9, "test": 3}
    assert data["positions"] == ["cls", *map(str, range(49))]
    head, norm = model.head, model.norm
    decided = 0
    for layer in range(3):
        for position in range(50):  # 0 is the CLS token, then the image tokens
            features = streams[:, layer, position]
            scores = ridge_by_hand(features[~test], truth[~test], features[test], 10)
            top2 = np.sort(scores, axis=1)[:, -2:]
            if np.all(top2[:, 1] - top2[:, 0] > 1e-6):  # a blank patch in every image: its probe ties classes
                decided += 1
                hits = float(np.mean(scores.argmax(axis=1) == truth[test]))
                assert data["accuracy"]["probe"][layer][position] == pytest.approx(hits, abs=1e-4), (layer, position)
            with torch.no_grad():
                logits = head(norm(torch.from_numpy(features[test]))).numpy()
            projected = float(np.mean(logits.argmax(axis=1) == truth[test]))
            assert data["accuracy"]["projection"][layer][position] == pytest.approx(projected, abs=1e-4), (
                layer,
                position,
            )
    assert decided > 100
    # 9 fitting images, fewer than 10 of any class: the few-shot probes are the full ones.
    assert data["accuracy"]["few_shot"] == data["accuracy"]["probe"]
    assert data["cls"]["probe"] == [row[0] for row in data["accuracy"]["probe"]]
    # The maps at the last layer (the default): the probe of token j scores the true class at x_L[j].
    maps = data["maps"]
    assert maps["layer"] == 2
    first = maps["examples"][0]
    assert first["image"] == 3
    expected = [
        ridge_by_hand(streams[~test, 2, 1 + j], truth[~test], streams[3:4, 2, 1 + j], 10)[0, truth[3]]
        for j in range(49)
    ]
    assert np.allclose(first["probe"], np.reshape(expected, (7, 7)), atol=1e-3)
    with torch.no_grad():
        logits = head(norm(torch.from_numpy(streams[3, 2, 1:]))).numpy()
    assert np.allclose(first["projection"], logits[:, truth[3]].reshape(7, 7), atol=1e-3)
    # Nothing removed yet: every method starts from the model's accuracy on the held-out images.
    with torch.no_grad():
        predicted = model(tiny.preprocess([images[i] for i in np.flatnonzero(test)])).argmax(dim=-1).numpy()
    accuracy = float(np.mean(predicted == truth[test]))
    for method in ("probe", "projection", "random"):
        for direction in ("positive", "negative"):
            curve = data["faithfulness"][method][direction]
            assert curve["accuracy"][0] == pytest.approx(accuracy, abs=1e-4)
            assert len(curve["accuracy"]) == len(curve["fractions"]) == 10
            assert 0.0 <= curve["auc"]["accuracy"] <= 1.0


def test_few_shot_takes_the_first_fitting_images_of_each_class():
    labels = torch.tensor([0, 1, 0, 0, 1, 0, 2, 0])
    fitting = torch.tensor([True, True, True, False, True, True, True, True])
    chosen = few_shot_rows(labels, fitting, per_class=2)
    assert chosen.tolist() == [True, True, True, False, True, False, True, False]


def test_layers_are_grouped_to_the_feature_budget():
    assert layer_groups(5, 10, 4, 8, budget=10**9) == [[0, 1, 2, 3, 4]]
    assert layer_groups(5, 10, 4, 8, budget=2 * 10 * 4 * 8 * 4) == [[0, 1], [2, 3], [4]]
    assert layer_groups(3, 10, 4, 8, budget=1) == [[0], [1], [2]]


# -- significance -------------------------------------------------------------------------------------


def identifiability_by_hand(model, images, targets):
    """``[B, L + 1]``: mean over image tokens of 1 - rank / C, the rank counted here."""
    streams = block_outputs(model, images)[:, :, model.num_prefix_tokens :]
    with torch.no_grad():
        logits = model.head(model.norm(streams))  # [B, L + 1, N, C]
    own = logits.gather(-1, targets[:, None, None, None].expand(*logits.shape[:3], 1))
    ranks = (logits > own).sum(dim=-1).double()
    return (1 - ranks / logits.shape[-1]).mean(dim=-1).numpy()


def test_paired_tests_by_hand():
    trained = np.array([[1.0, 0.5], [2.0, 0.5], [3.0, 0.5]])
    random = np.array([[0.0, 0.5], [0.0, 0.5], [0.0, 0.5]])
    shifted, same = paired_tests(trained, random)
    # Three positive differences: the rank sum is 1 + 2 + 3 = 6, reached by 1 of the 2^3 sign patterns.
    assert shifted == {"statistic": 6.0, "p_value": pytest.approx(1 / 8), "n": 3, "nonzero": 3}
    assert same == {"statistic": 0.0, "p_value": 1.0, "n": 3, "nonzero": 0}


def test_significance_against_scipy_on_values_computed_here(tiny):
    samples = bundled_samples(PAIRS)
    outcome = analyse("significance", tiny, samples)
    assert set(outcome.figures) == {"significance"}
    assert outcome.figures["significance"].startswith(b"\x89PNG")
    data = outcome.data
    images, truth = samples
    batch, targets = tiny.preprocess(images), torch.as_tensor(truth)
    random_model = random_copy(tiny)
    trained = identifiability_by_hand(tiny.network, batch, targets)
    random = identifiability_by_hand(random_model, batch, targets)
    summary = data["identifiability"]
    assert summary["n"] == [PAIRS] * 3
    assert np.allclose(summary["trained"], trained.mean(axis=0), atol=1e-4)
    assert np.allclose(summary["random"], random.mean(axis=0), atol=1e-4)
    for layer in range(3):
        expected = stats.wilcoxon(trained[:, layer], random[:, layer], alternative="greater")
        assert summary["p_value"][layer] == pytest.approx(expected.pvalue, rel=1e-4)
        assert summary["statistic"][layer] == pytest.approx(expected.statistic)
        assert summary["significant"][layer] == (expected.pvalue < 0.05 / 3)
    agreement = {
        name: np.stack(
            [
                key_value_agreement(net, memory_scores(net), [(batch[i : i + 1], targets[i : i + 1])])
                for i in range(PAIRS)
            ]
        )
        for name, net in (("trained", tiny.network), ("random", random_model))
    }
    for layer in range(2):
        pair = agreement["trained"][:, layer], agreement["random"][:, layer]
        differ = np.any(pair[0] != pair[1])  # scipy ranks nothing when no pair differs: the kind says p = 1
        expected = stats.wilcoxon(*pair, alternative="greater").pvalue if differ else 1.0
        assert data["agreement"]["p_value"][layer] == pytest.approx(expected, rel=1e-4)
    assert data["alternative"].startswith("greater")


def test_layer_is_checked_against_the_kind_and_the_model(tiny, samples):
    images, truth = samples
    for kind, layer, message in (
        ("gradient-parts", 0, "out of range: the blocks of gradient-parts are 1 to 2"),
        ("gradient-parts", 3, "out of range"),
        ("token-probes", 3, r"layers \(0 = the embedding\) of token-probes are 0 to 2"),
        ("significance", 1, "layer is a parameter of gradient-parts and token-probes only"),
    ):
        with pytest.raises(AnalysisError, match=message):
            run_analysis(AnalysisRequest(kind=kind, layer=layer), [tiny], images, truth)


# -- the request and the command line ----------------------------------------------------------------


def test_an_unset_layer_leaves_the_canonical_parameters_as_they_were():
    assert "layer" not in AnalysisRequest(kind="cka").model_dump(mode="json")  # content keys of old requests
    given = AnalysisRequest(kind="gradient-parts", layer=2).model_dump(mode="json")
    assert given["layer"] == 2
    assert AnalysisRequest.model_validate(given) == AnalysisRequest(kind="gradient-parts", layer=2)


def test_classlens_analyze_gradient_parts_on_image_files(tmp_path):
    from click.testing import CliRunner

    from classlens.cli import main

    files = sorted(BUNDLED_SAMPLES.glob("*.png"))[:4]
    arguments = ["analyze", "gradient-parts", *files, "--model", "fmnist-vit@1", "--layer", 2, "--out", tmp_path]
    result = CliRunner().invoke(main, [str(a) for a in arguments], env={"CLASSLENS_MODEL_DIRS": ""})
    assert result.exit_code == 0, result.output
    stored = json.loads((tmp_path / "gradient_parts.json").read_text())
    assert stored["data"]["head_block"] == 2
    assert stored["data"]["targets"] == "predicted class"
    assert (tmp_path / "gradient_parts_heads.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "gradient_parts_blocks.png").read_bytes().startswith(b"\x89PNG")
