"""run_analysis, the one entry point of the CLI and the worker task, on the bundled Fashion-MNIST models."""

import csv
import json
import typing

import numpy as np
import pytest
import torch
from PIL import Image

from classlens.core.contract import ANALYSIS_RULES, AnalysisKind, AnalysisRequest
from model_store.catalog import BUNDLED_ROOT, BUNDLED_SAMPLES, Catalog
from worker.analyses.job import AnalysisJob, Steps
from worker.analyses.run import RUNNERS, AnalysisError, run_analysis
from worker.lens.vit import UnsupportedModelError
from worker.runtime import ModelCache, load

SAMPLES = BUNDLED_SAMPLES


@pytest.fixture(scope="module")
def models(bundled_catalog):
    cpu = torch.device("cpu")
    names = ("fmnist-vit", "fmnist-vit-10pct", "fmnist-resnet")  # version 1 of each: a newer one may be added
    return {name: load(bundled_catalog.resolve(f"{name}@1"), cpu, require_vit=False) for name in names}


@pytest.fixture(scope="module")
def samples():
    with (SAMPLES / "labels.csv").open() as stream:
        rows = list(csv.DictReader(stream))[:12]
    images = [Image.open(SAMPLES / row["file"]).convert("L") for row in rows]
    return images, np.array([int(row["label_index"]) for row in rows])


def run(kind, models, samples, labels=True, **fields):
    images, truth = samples
    calls = []
    outcome = run_analysis(
        AnalysisRequest(kind=kind, batch_size=4, **fields),
        models,
        images,
        truth if labels else None,
        lambda done, total: calls.append((done, total)),
    )
    json.dumps(outcome.data, allow_nan=False)  # JSON-ready: no NaN, no tensors
    assert calls, calls
    assert calls[-1][0] == calls[-1][1] > 0, calls
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    return outcome


@pytest.mark.parametrize(
    ("kind", "figures", "keys"),
    [
        ("cka", {"cka"}, {"matrix", "rows", "columns"}),
        ("attention-distance", {"attention_distance"}, {"distances", "mean_per_block", "prefix"}),
        ("skip-ratio", {"skip_ratio"}, {"attention_cls", "attention_image", "mlp_cls", "mlp_image"}),
        ("localization", {"localization"}, {"maps", "own_position_share"}),
        ("probes", {"probes"}, {"probes", "projection", "split"}),
        (
            "memories",
            {"memories", "memories_agreement", "memories_attention", "memories_correctness"},
            {"mlp", "attention", "top_memories", "by_correctness"},
        ),
        ("perturb", {"perturb"}, {"identifiability", "top1_hits", "region"}),
        ("residual", {"composition", "updates"}, {"update_rises", "composition_composed", "target"}),
    ],
)
def test_every_kind_on_the_vit(models, samples, kind, figures, keys):
    outcome = run(kind, [models["fmnist-vit"]], samples)
    assert set(outcome.figures) == figures
    assert all(png.startswith(b"\x89PNG") for png in outcome.figures.values())
    assert keys <= set(outcome.data)


def test_residual_analyses_are_image_weighted_means_of_the_library_values(models, samples):
    from worker.analyses.residual import categorical_updates, residual_composition

    loaded = models["fmnist-vit"]
    images, truth = samples
    data = run("residual", [loaded], samples).data  # in batches of 4
    batch = loaded.preprocess(images)
    direct = categorical_updates(loaded.network, batch, torch.as_tensor(truth))
    shares = residual_composition(loaded.network, batch)
    assert data["target"] == "true class"
    assert len(data["layers"]) == len(loaded.network.blocks)
    assert np.allclose(data["update_rises"], direct["rises"].numpy(), atol=1e-4)
    assert np.allclose(data["update_mlp_update"], direct["mlp_update"].numpy(), atol=1e-3)
    assert np.allclose(data["composition_composed"], shares["composed"].numpy(), atol=1e-4)


def test_numbers_where_they_are_known(models, samples):
    vit = models["fmnist-vit"]
    cka = run("cka", [vit], samples).data
    assert cka["examples"] == 12
    assert cka["batches"] == 3
    assert all(abs(cka["matrix"][i][i] - 1) < 1e-6 for i in range(6))
    distances = run("attention-distance", [vit], samples, prefix_rows="renormalise").data
    assert distances["prefix"] == "renormalise"
    assert len(distances["distances"]) == 6
    probes = run("probes", [vit], samples).data
    assert probes["split"] == {"rule": probes["split"]["rule"], "train": 9, "test": 3}
    perturb = run("perturb", [vit], samples, labels=False, region=(0, 0, 2, 7)).data
    assert perturb["targets"] == "predicted class"
    assert perturb["kept_tokens"] == 35
    assert perturb["top1_hits"]["original"] == 1.0  # scored against its own predictions
    memories = run("memories", [vit], samples, top_memories=3).data
    assert len(memories["top_memories"]) == 6
    assert len(memories["top_memories"][0]["Bag"]) == 3


def test_the_cnn(models, samples):
    resnet = models["fmnist-resnet"]
    assert run("cka", [resnet], samples, representation="gap").data["rows"]["layers"][0] == "act1"
    assert run("skip-ratio", [resnet], samples).data["architecture"] == "cnn"
    assert run("probes", [resnet], samples).data["projection"] is None


def test_cka_across_two_versions_pairs_layers(models, samples):
    vit, small_data = models["fmnist-vit"], models["fmnist-vit-10pct"]
    data = run("cka", [vit, small_data], samples, compare_to="fmnist-vit-10pct").data
    assert data["across"]
    assert len(data["same_layer"]) == 6
    assert len(data["best_match"]) == 6
    again = load(vit.entry, torch.device("cpu"))  # the same weights, loaded twice: identical representations
    same = run("cka", [vit, again], samples, compare_to="fmnist-vit").data
    assert all(abs(value - 1) < 1e-6 for value in same["same_layer"])
    # A worker's model cache hands out one object for both names: still a comparison.
    itself = run("compare", [vit, vit], samples, compare_to="fmnist-vit@1")
    assert all(abs(value - 1) < 1e-6 for value in itself.data["cka"]["same_layer"])


def test_compare_writes_one_self_contained_report(models, samples):
    outcome = run("compare", [models["fmnist-vit"], models["fmnist-resnet"]], samples, compare_to="fmnist-resnet")
    assert set(outcome.figures) == {
        "cka",
        "attention_distance",
        "skip_ratio_a",
        "skip_ratio_b",
        "probes_a",
        "probes_b",
        "report",
    }
    page = outcome.figures["report"].decode("utf-8")
    assert "fmnist-vit@1" in page
    assert "fmnist-resnet@1" in page
    assert page.count("data:image/png;base64,") == 6  # the attention scatter holds the one ViT
    assert outcome.data["per_model"][1]["attention_distance"] is None
    unlabelled = run(
        "compare",
        [models["fmnist-vit"], models["fmnist-vit-10pct"]],
        samples,
        labels=False,
        compare_to="fmnist-vit-10pct",
    )
    assert "probes_a" not in unlabelled.figures
    assert "Not run" in unlabelled.figures["report"].decode()


@pytest.mark.parametrize(
    ("kind", "which", "count", "labels", "fields", "message"),
    [
        ("cka", ["fmnist-vit"], 3, True, {}, "at least 4"),
        ("probes", ["fmnist-vit"], 8, False, {}, "probes need labels"),
        ("attention-distance", ["fmnist-resnet"], 8, True, {}, "needs a Vision Transformer"),
        ("localization", ["fmnist-resnet"], 8, True, {}, "needs a Vision Transformer"),
        ("compare", ["fmnist-vit"], 8, True, {}, "compare needs compare_to"),
        ("compare", ["fmnist-vit"], 8, True, {"compare_to": "fmnist-resnet"}, "takes 2 model"),
        ("perturb", ["fmnist-vit"], 8, True, {"region": (0, 0, 8, 2)}, "not a box on the 7x7 grid"),
        ("perturb", ["fmnist-vit"], 8, True, {"region": (0, 0, 7, 7)}, "whole"),
        ("cka", ["fmnist-vit"], 8, True, {"region": (0, 0, 1, 1)}, "perturb only"),
        ("cka", ["fmnist-resnet"], 8, True, {"representation": "cls"}, "fmnist-resnet@1: a CNN has no CLS"),
        ("probes", ["fmnist-resnet"], 8, True, {"representation": "cls"}, "no 'cls' position"),
    ],
)
def test_requests_that_cannot_be_honoured(models, samples, kind, which, count, labels, fields, message):
    images, truth = samples
    request = AnalysisRequest(kind=kind, batch_size=4, **fields)
    with pytest.raises(AnalysisError, match=message):
        run_analysis(request, [models[n] for n in which], images[:count], truth[:count] if labels else None)


def test_labels_are_checked(models, samples):
    images, _ = samples
    request = AnalysisRequest(kind="probes")
    with pytest.raises(AnalysisError, match="labels for 12 images"):
        run_analysis(request, [models["fmnist-vit"]], images, np.zeros(3, dtype=np.int64))
    with pytest.raises(AnalysisError, match=r"class indices 0\.\.9"):
        run_analysis(request, [models["fmnist-vit"]], images, np.full(12, 10))


def test_a_short_last_batch_joins_the_one_before():
    request = AnalysisRequest(kind="cka", batch_size=4)
    job = AnalysisJob(request, [], [Image.new("L", (28, 28))] * 10, None, Steps(lambda done, total: None))
    assert job.spans == [(0, 4), (4, 10)]


def test_non_vits_load_only_when_asked(bundled_catalog):
    entry = bundled_catalog.resolve("fmnist-resnet@1")
    with pytest.raises(UnsupportedModelError):
        load(entry, torch.device("cpu"))
    cache = ModelCache(Catalog([BUNDLED_ROOT]), torch.device("cpu"))
    assert type(cache.get("fmnist-resnet@1", require_vit=False).network).__name__ == "ResNet"
    with pytest.raises(UnsupportedModelError):
        cache.get("fmnist-resnet@1")  # cached for an analysis, still refused for explaining
    assert cache.get("fmnist-vit@1") is cache.get("fmnist-vit@1", require_vit=False)


def test_every_kind_has_one_row_of_rules_and_one_runner():
    assert set(ANALYSIS_RULES) == set(typing.get_args(AnalysisKind)) == set(RUNNERS)


@pytest.mark.parametrize("kind", sorted(ANALYSIS_RULES))
def test_the_worker_refuses_what_the_rules_table_rules_out(models, samples, kind):
    rules = ANALYSIS_RULES[kind]
    images, truth = samples
    vit, resnet = models["fmnist-vit"], models["fmnist-resnet"]
    two = {"compare_to": "fmnist-vit"} if rules.second_model == "required" else {}
    pair = [vit, vit] if two else [vit]

    def refused(message, which, labels=truth, count=None, **fields):
        request = AnalysisRequest(kind=kind, batch_size=4, **{**two, **fields})
        given = images[:count] if count else images
        with pytest.raises(AnalysisError, match=message):
            run_analysis(request, which, given, None if labels is None else labels[: len(given)])

    refused("at least 4", pair, count=3)
    if rules.second_model == "required":
        refused(f"{kind} needs compare_to", [vit], compare_to=None)
    if rules.second_model == "never":
        refused(f"{kind} takes 1 model", [vit, vit], compare_to="fmnist-vit")
    if rules.labels == "required":
        refused(f"{kind} need labels", pair, labels=None)
    if rules.labels != "ignored":
        refused(r"class indices 0\.\.9", pair, labels=np.full(len(images), 10))
    if rules.vit:
        refused("needs a Vision Transformer", [resnet] * len(pair))
    if not rules.region:
        refused("region is a parameter of perturb only", pair, region=(0, 0, 1, 1))
    if not rules.layer:
        refused("layer is a parameter of gradient-parts and token-probes only", pair, layer=1)
