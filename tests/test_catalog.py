"""Catalog resolution and checksum verification over real store folders."""

import shutil

import pytest
import torch

from model_store.artifacts import ArtifactError
from model_store.catalog import Catalog, ModelNotFoundError
from model_store.manifest import read_manifest, write_manifest
from tests.conftest import DEMO_MODELS
from worker import model_loader


def test_bundled_demo_models_are_listed_and_verify(bundled_catalog):
    assert set(DEMO_MODELS) <= set(bundled_catalog.names())
    results = bundled_catalog.verify()
    assert results and all(result.ok for result in results), results


def test_resolve_name_gives_newest_version_and_name_at_version_is_exact(store_copy):
    source = store_copy / "fmnist-vit" / "1"
    for version in ("9", "10"):
        shutil.copytree(source, store_copy / "fmnist-vit" / version)
        manifest = read_manifest(source / "manifest.yaml").model_copy(update={"version": version})
        write_manifest(manifest, store_copy / "fmnist-vit" / version / "manifest.yaml")
    catalog = Catalog([store_copy])
    assert catalog.versions("fmnist-vit") == ["1", "2", "9", "10"]  # numeric order, not text order
    assert catalog.resolve("fmnist-vit").reference == "fmnist-vit@10"
    assert catalog.resolve("fmnist-vit@9").folder == store_copy / "fmnist-vit" / "9"
    with pytest.raises(ModelNotFoundError, match="has no version '3'; versions: 1, 2, 9, 10"):
        catalog.resolve("fmnist-vit@3")
    with pytest.raises(ModelNotFoundError, match="unknown model 'nope'; known models: fmnist-resnet"):
        catalog.resolve("nope")


def test_a_manifest_in_the_wrong_folder_is_reported_not_served(store_copy):
    shutil.move(store_copy / "fmnist-vit" / "1", store_copy / "fmnist-vit" / "7")
    catalog = Catalog([store_copy])
    assert catalog.versions("fmnist-vit") == ["2"]  # the misplaced version is not served
    assert any("manifest says fmnist-vit@1, but the folder is fmnist-vit/7" in e for e in catalog.errors)


def test_earlier_root_shadows_a_later_one(store_copy, tmp_path, bundled_catalog):
    catalog = Catalog([store_copy, tmp_path / "empty"])
    assert catalog.resolve("fmnist-vit").folder == store_copy / "fmnist-vit" / "2"
    assert Catalog.default([store_copy]).resolve("fmnist-vit").folder.is_relative_to(store_copy)


@pytest.mark.parametrize("tamper", ["flip_byte", "truncate"])
def test_tampered_weights_are_refused_and_never_deserialised(store_copy, monkeypatch, tamper):
    weights = store_copy / "fmnist-vit" / "1" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if tamper == "flip_byte":
        data[len(data) // 2] ^= 0xFF
        expected = "sha256"
    else:
        data = data[:-100]
        expected = "size"
    weights.write_bytes(bytes(data))

    catalog = Catalog([store_copy])
    [result] = catalog.verify("fmnist-vit@1")
    assert not result.ok and expected in result.problems[0] and "refusing to load" in result.problems[0]

    def must_not_be_called(*args, **kwargs):
        raise AssertionError("tampered weights were read")

    monkeypatch.setattr(model_loader, "read_state_dict", must_not_be_called)
    with pytest.raises(ArtifactError, match=expected):
        model_loader.load_model(catalog.resolve("fmnist-vit@1"))


def test_missing_weights_file(store_copy):
    (store_copy / "fmnist-resnet" / "1" / "model.safetensors").unlink()
    [result] = Catalog([store_copy]).verify("fmnist-resnet")
    assert not result.ok and "artifact missing" in result.problems[0]


class Payload:
    """An arbitrary object in a checkpoint: weights_only=True must refuse to unpickle it."""


def test_pytorch_checkpoint_is_read_with_weights_only(tmp_path):
    state = {"weight": torch.ones(2, 2)}
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": state}, plain)
    assert torch.equal(model_loader.read_state_dict(plain, "pytorch")["weight"], state["weight"])

    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": state, "extra": Payload()}, pickled)  # arbitrary code to unpickle
    with pytest.raises(Exception, match=r"[Ww]eights only load failed"):
        model_loader.read_state_dict(pickled, "pytorch")
