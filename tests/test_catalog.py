"""Catalog resolution and checksum verification over real store folders."""

import shutil

import pytest
import torch

from model_store.artifacts import ArtifactError
from model_store.catalog import BUNDLED_ROOT, DISABLED_FILE, Catalog, ModelDisabledError, ModelNotFoundError
from model_store.manifest import read_manifest, write_manifest
from tests.conftest import DEMO_MODELS
from worker import model_loader


def test_bundled_demo_models_are_listed_and_verify(bundled_catalog):
    assert set(DEMO_MODELS) <= set(bundled_catalog.names())
    results = bundled_catalog.verify()
    assert results, results
    assert all(result.ok for result in results), results


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
    assert not result.ok
    assert expected in result.problems[0]
    assert "refusing to load" in result.problems[0]

    def must_not_be_called(*args, **kwargs):
        raise AssertionError("tampered weights were read")

    monkeypatch.setattr(model_loader, "read_state_dict", must_not_be_called)
    with pytest.raises(ArtifactError, match=expected):
        model_loader.load_model(catalog.resolve("fmnist-vit@1"))


def test_missing_weights_file(store_copy):
    (store_copy / "fmnist-resnet" / "1" / "model.safetensors").unlink()
    [result] = Catalog([store_copy]).verify("fmnist-resnet")
    assert not result.ok
    assert "artifact missing" in result.problems[0]


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


# -- a catalog that follows its store while the service runs, and disabled versions --------------------------


def _add_version(root, version: str, source: str = "fmnist-vit/1"):
    """Another version of fmnist-vit in ``root``, written the way add_model does (staged, then renamed in)."""
    staging = root / "fmnist-vit" / f".adding-{version}-x"
    shutil.copytree(root / source, staging)
    manifest = read_manifest(staging / "manifest.yaml").model_copy(update={"version": version})
    write_manifest(manifest, staging / "manifest.yaml")
    return staging


def test_a_refreshing_catalog_sees_versions_added_replaced_and_removed(store_copy):
    catalog = Catalog([store_copy], refresh_s=0)
    assert catalog.versions("fmnist-vit") == ["1", "2"]
    assert not catalog.refresh()  # nothing changed: the stamp (a stat of every manifest) is the same

    staging = _add_version(store_copy, "3")
    assert catalog.versions("fmnist-vit") == ["1", "2"]  # a staged version is not served, nor reported
    assert not any(".adding" in error for error in catalog.errors)
    staging.rename(store_copy / "fmnist-vit" / "3")
    assert catalog.versions("fmnist-vit") == ["1", "2", "3"]
    assert catalog.resolve("fmnist-vit").reference == "fmnist-vit@3"

    before = catalog.resolve("fmnist-vit@3")
    replaced = read_manifest(store_copy / "fmnist-vit" / "3" / "manifest.yaml").model_copy(
        update={"description": "registered again"}
    )
    write_manifest(replaced, store_copy / "fmnist-vit" / "3" / "new.yaml")
    (store_copy / "fmnist-vit" / "3" / "new.yaml").replace(store_copy / "fmnist-vit" / "3" / "manifest.yaml")
    after = catalog.resolve("fmnist-vit@3")
    assert after.manifest.description == "registered again"
    assert after != before

    shutil.rmtree(store_copy / "fmnist-vit" / "3")
    assert catalog.versions("fmnist-vit") == ["1", "2"]


def test_a_catalog_looks_again_at_once_when_a_reference_is_missing(store_copy):
    catalog = Catalog([store_copy], refresh_s=3600)  # the period alone would not look again in this test
    _add_version(store_copy, "5").rename(store_copy / "fmnist-vit" / "5")
    assert catalog.versions("fmnist-vit") == ["1", "2"]  # not yet looked
    assert catalog.resolve("fmnist-vit@5").folder == store_copy / "fmnist-vit" / "5"  # a miss looks at once
    with pytest.raises(ModelNotFoundError, match="has no version '6'"):
        catalog.resolve("fmnist-vit@6")


def test_a_static_catalog_reads_its_roots_once(store_copy):
    catalog = Catalog([store_copy])
    _add_version(store_copy, "5").rename(store_copy / "fmnist-vit" / "5")
    with pytest.raises(ModelNotFoundError):
        catalog.resolve("fmnist-vit@5")
    assert catalog.refresh()
    assert catalog.resolve("fmnist-vit@5")


def test_disabling_a_version_keeps_its_files_and_stops_serving_it(store_copy):
    catalog = Catalog([store_copy], refresh_s=3600)
    other = Catalog([store_copy], refresh_s=0)  # another process' catalog over the same store
    files = sorted(path.name for path in (store_copy / "fmnist-vit" / "2").iterdir())

    disabled = catalog.disable("fmnist-vit@2", note="tests")
    assert disabled.disabled
    assert (store_copy / "fmnist-vit" / "2" / DISABLED_FILE).is_file()
    assert "delete this file to enable it again" in (store_copy / "fmnist-vit" / "2" / DISABLED_FILE).read_text()
    assert sorted(path.name for path in (store_copy / "fmnist-vit" / "2").iterdir()) == sorted([*files, DISABLED_FILE])
    for seen in (catalog, other):
        with pytest.raises(ModelDisabledError, match="fmnist-vit@2 is disabled; versions served: 1"):
            seen.resolve("fmnist-vit@2")
        assert seen.resolve("fmnist-vit").reference == "fmnist-vit@1"  # the newest version still served
        assert seen.is_disabled("fmnist-vit@2")
        assert not seen.is_disabled("fmnist-vit@1")
        assert seen.versions("fmnist-vit") == ["1"]
        assert seen.versions("fmnist-vit", include_disabled=True) == ["1", "2"]
        assert [e.reference for e in seen.listing(include_disabled=True) if e.disabled] == ["fmnist-vit@2"]
        assert "fmnist-vit@2" not in [e.reference for e in seen.listing()]
        assert seen.resolve("fmnist-vit@2", include_disabled=True).disabled
    assert catalog.disable("fmnist-vit@2").disabled  # idempotent

    catalog.disable("fmnist-vit@1")
    with pytest.raises(ModelDisabledError, match=r"every version of model 'fmnist-vit' is disabled \(1, 2\)"):
        catalog.resolve("fmnist-vit")
    assert isinstance(ModelDisabledError("x"), ModelNotFoundError)  # code that only asks "available?" refuses it

    (store_copy / "fmnist-vit" / "2" / DISABLED_FILE).unlink()  # enabling is deleting the marker
    assert other.resolve("fmnist-vit").reference == "fmnist-vit@2"
    assert catalog.enable("fmnist-vit@1").reference == "fmnist-vit@1"
    assert catalog.versions("fmnist-vit") == ["1", "2"]


def test_disabling_needs_a_version_that_exists(store_copy):
    catalog = Catalog([store_copy])
    with pytest.raises(ValueError, match="names no version"):
        catalog.disable("fmnist-vit")
    with pytest.raises(ModelNotFoundError):
        catalog.disable("fmnist-vit@9")
    assert not list(store_copy.glob(f"*/*/{DISABLED_FILE}"))


def test_a_disabled_version_in_an_earlier_root_shadows_the_later_one(store_copy, tmp_path):
    Catalog([store_copy]).disable("fmnist-vit@2")
    catalog = Catalog([store_copy, BUNDLED_ROOT])
    with pytest.raises(ModelDisabledError):
        catalog.resolve("fmnist-vit@2")  # the user disabled it: the bundled copy does not come back


def test_labels_are_read_once_per_entry_and_afresh_after_a_refresh_finds_the_model_changed(store_copy):
    catalog = Catalog([store_copy], refresh_s=0)
    folder = store_copy / "fmnist-vit" / "1"
    labels = catalog.resolve("fmnist-vit@1").labels()
    assert labels[1] == "Trouser"
    labels.append("changed by the caller")  # a copy: the entry's reading stays as it was
    (folder / "labels.txt").rename(folder / "labels.moved")
    assert catalog.resolve("fmnist-vit@1").labels()[1] == "Trouser", "not read from disk again"
    assert not catalog.verify("fmnist-vit@1")[0].ok, "verify looks at the file itself"
    renamed = [f"class {n}" for n in range(10)]
    (folder / "labels.txt").write_text("\n".join(renamed) + "\n", encoding="utf-8")
    manifest = read_manifest(folder / "manifest.yaml")
    write_manifest(manifest.model_copy(update={"description": "relabelled"}), folder / "manifest.yaml")
    relabelled = catalog.resolve("fmnist-vit@1")  # the refresh found the manifest changed: a new entry
    assert relabelled.labels()[1] == "class 1"
    assert catalog.verify("fmnist-vit@1")[0].ok
