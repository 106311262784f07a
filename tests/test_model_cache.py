"""The worker's model cache: bounded in models and bytes, least recently used out first, reloaded when changed.

Real tiny timm ViTs, registered the way ``classlens models add`` registers them, loaded on CPU.
"""

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import worker  # noqa: F401  (torchvision compatibility before timm)
from model_store.catalog import Catalog, ModelChangedError, ModelDisabledError
from model_store.sources import ModelSources, RegisterOptions
from worker.lens.adapter import UnsupportedModelError
from worker.random_models import random_vit
from worker.registration import register
from worker.runtime import LoadedModel, LoadedViT, ModelCache

CPU = torch.device("cpu")
ARCHITECTURE = "vit_tiny_patch16_224"


def _args(width: int) -> dict:
    return {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": width, "num_heads": 2, "num_classes": 3}


def add(root: Path, work: Path, name: str, *, width: int = 64, labels=("cat", "dog", "bird"), overwrite=False):
    """Register a random tiny ViT ``name@1`` (``width`` wide) into ``root``; its entry."""
    work.mkdir(parents=True, exist_ok=True)
    model = random_vit(ARCHITECTURE, seed=width, **_args(width))
    weights, label_file = work / f"{name}.safetensors", work / f"{name}.txt"
    save_file(model.state_dict(), str(weights))
    label_file.write_text("\n".join(labels) + "\n")
    options = RegisterOptions(name=name, architecture=ARCHITECTURE, model_args=_args(width), overwrite=overwrite)
    return register(ModelSources.locate(weights, labels=label_file), options, root)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """``a``, ``b``, ``c`` (64 wide) and ``wide`` (128 wide) in one store root."""
    work = tmp_path_factory.mktemp("cache-models")
    root = work / "models"
    for name in ("a", "b", "c"):
        add(root, work / "files", name)
    add(root, work / "files", "wide", width=128)
    return root


def _cache(root: Path, **bounds) -> ModelCache:
    return ModelCache(Catalog([root], refresh_s=0), CPU, onnx="off", **bounds)


def _evictions(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.getMessage().startswith("evicted")]


def test_at_most_max_models_least_recently_used_evicted_first(store, caplog):
    caplog.set_level(logging.INFO, logger="worker.runtime")
    cache = _cache(store, max_models=2)
    first = cache.get("a")
    cache.get("b")
    assert cache.get("a") is first  # a hit: the same object, and "a" is now the most recently used
    assert cache.references == ["b@1", "a@1"]
    cache.get("c")
    assert cache.references == ["a@1", "c@1"]  # "b" was the least recently used
    [message] = _evictions(caplog)
    assert message.startswith("evicted b@1 (")
    assert "MiB of parameters and buffers" in message
    assert "to make room for c@1 (model_cache_max_models=2)" in message
    assert cache.get("a") is first


def test_at_most_max_bytes_of_parameters_and_buffers(store, caplog):
    caplog.set_level(logging.INFO, logger="worker.runtime")
    probe = _cache(store)
    small = ModelCache.footprint(probe.get("a"))
    wide = ModelCache.footprint(probe.get("wide"))
    network = probe.get("a").network
    exact = sum(t.numel() * t.element_size() for t in [*network.parameters(), *network.buffers()])
    assert small == exact
    assert wide > 3 * small

    cache = _cache(store, max_models=10, max_bytes=2 * small + small // 2)  # two small ones fit, not three
    for name in ("a", "b"):
        cache.get(name)
    assert cache.references == ["a@1", "b@1"]
    assert cache.bytes_held == 2 * small
    cache.get("c")
    assert cache.references == ["b@1", "c@1"]
    assert cache.bytes_held == 2 * small
    assert "model_cache_max_bytes" in _evictions(caplog)[-1]
    assert "evicted a@1" in _evictions(caplog)[-1]

    # Larger than the whole budget: served alone, with a warning, rather than refused.
    cache.get("wide")
    assert cache.references == ["wide@1"]
    assert cache.bytes_held == wide
    assert any("more than the cache's" in record.getMessage() for record in caplog.records)
    assert cache.get("a")
    assert cache.references == ["a@1"]


def test_a_model_registered_again_is_loaded_again(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="worker.runtime")
    root = tmp_path / "models"
    entry = add(root, tmp_path / "files", "relabelled")
    cache = _cache(root)
    before = cache.get("relabelled@1")
    assert before.labels == ["cat", "dog", "bird"]
    assert cache.get("relabelled@1", fingerprint=entry.result_fingerprint) is before

    again = add(root, tmp_path / "files", "relabelled", labels=("ant", "bee", "cow"), overwrite=True)
    after = cache.get("relabelled@1")
    assert after is not before
    assert after.labels == ["ant", "bee", "cow"]
    assert after.entry.result_fingerprint == again.result_fingerprint != entry.result_fingerprint
    assert any("relabelled@1" in m and "catalog entry changed" in m for m in _evictions(caplog))
    assert cache.references == ["relabelled@1"]

    # A job keyed with the old content is refused, not explained with the new model.
    with pytest.raises(ModelChangedError, match="registered again"):
        cache.get("relabelled@1", fingerprint=entry.result_fingerprint)


def test_a_job_keyed_a_moment_ago_finds_the_version_this_cache_has_not_seen_yet(tmp_path):
    root = tmp_path / "models"
    add(root, tmp_path / "files", "fresh")
    cache = ModelCache(Catalog([root], refresh_s=3600), CPU, onnx="off")  # its view will be stale
    cache.get("fresh@1")
    again = add(root, tmp_path / "files", "fresh", labels=("x", "y", "z"), overwrite=True)
    # The API keyed the job with the new fingerprint: the cache looks again instead of failing it.
    assert cache.get("fresh@1", fingerprint=again.result_fingerprint).labels == ["x", "y", "z"]


def test_a_disabled_model_is_refused_and_dropped(store, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="worker.runtime")
    root = tmp_path / "models"
    add(root, tmp_path / "files", "soon-off")
    add(root, tmp_path / "files", "stays")
    cache = _cache(root)
    cache.get("soon-off@1")
    Catalog([root]).disable("soon-off@1")
    with pytest.raises(ModelDisabledError):
        cache.get("soon-off@1")
    cache.get("stays")
    assert cache.references == ["stays@1"]
    assert any(m.startswith("evicted soon-off@1") and m.endswith("disabled") for m in _evictions(caplog))


def test_a_cnn_is_a_loaded_model_and_only_a_vit_explains(bundled_catalog):
    """A model loaded for the analyses alone does not pass for one that the lens can explain."""
    cache = ModelCache(bundled_catalog, CPU, onnx="off")
    cnn = cache.get("fmnist-resnet@1", require_vit=False)
    assert type(cnn) is LoadedModel
    assert not hasattr(cnn, "explain")
    assert not hasattr(cnn, "spec")
    assert type(cnn.network).__name__ == "ResNet"
    with pytest.raises(UnsupportedModelError, match="not a timm VisionTransformer"):
        cache.get("fmnist-resnet@1")  # cached for an analysis, still refused for explaining
    vit = cache.get("fmnist-vit@1", require_vit=False)
    assert isinstance(vit, LoadedViT)
    assert vit.spec.depth == len(vit.timm_vit.blocks)
    assert cache.get("fmnist-vit@1") is vit


def test_the_buffers_a_models_explanations_keep_count_towards_max_bytes(store, caplog):
    caplog.set_level(logging.INFO, logger="worker.runtime")
    probe = _cache(store)
    small = ModelCache.footprint(probe.get("a"))
    cache = _cache(store, max_models=10, max_bytes=2 * small + small // 2)  # two small ones fit, as above
    grown = cache.get("a")
    assert isinstance(grown, LoadedViT)
    grown.workspace.empty("streams", (small,), torch.uint8, CPU)  # as a large request would have grown it
    assert cache.bytes_held == 2 * small
    cache.get("b")  # a's weights and buffers and b's weights: more than the budget, so a goes
    assert cache.references == ["b@1"]
    assert "evicted a@1" in _evictions(caplog)[-1]
    assert cache.bytes_held == small
