"""Result keys: a cached result can only answer for the model content and method version that computed it.

Every case is a real store folder (a copy of a bundled model, its manifest or labels changed
the way a re-registration would change them), read through the catalog as the API reads it.
"""

import shutil
from pathlib import Path

import pytest

from classlens.core import contract
from classlens.core.contract import ExplainRequest
from classlens.core.jobs import JobStore, content_key
from classlens.core.store import SqliteStore
from model_store.catalog import BUNDLED_ROOT, Catalog, ModelEntry
from model_store.manifest import MANIFEST_FILE, Artifact, Metric, Structure, read_manifest, write_manifest

SOURCE = BUNDLED_ROOT / "fmnist-vit" / "2"
PARAMETERS = ExplainRequest(layers=[6]).model_dump(mode="json")


def _copy(tmp_path: Path, name: str = "fmnist-vit", version: str = "2") -> Path:
    folder = tmp_path / "store" / name / version
    shutil.copytree(SOURCE, folder)
    if (name, version) != ("fmnist-vit", "2"):
        manifest = read_manifest(folder / MANIFEST_FILE).model_copy(update={"name": name, "version": version})
        write_manifest(manifest, folder / MANIFEST_FILE)
    return folder


def _entry(folder: Path) -> ModelEntry:
    manifest = read_manifest(folder / MANIFEST_FILE)
    return Catalog([folder.parent.parent]).resolve(manifest.reference)


def _rewrite(folder: Path, **changes) -> None:
    manifest = read_manifest(folder / MANIFEST_FILE)
    write_manifest(manifest.model_copy(update=changes), folder / MANIFEST_FILE)


@pytest.fixture
def original(tmp_path) -> ModelEntry:
    return _entry(_copy(tmp_path / "original"))


def test_the_fingerprint_is_stable_and_is_what_keys_are_made_of(original, tmp_path):
    again = _entry(_copy(tmp_path / "again"))
    assert again.result_fingerprint == original.result_fingerprint  # another folder, the same content
    key = content_key(original.result_fingerprint, "image", PARAMETERS)
    assert key == content_key(again.result_fingerprint, "image", PARAMETERS)
    assert key != content_key(original.manifest.weights.sha256, "image", PARAMETERS)


def _labels(folder: Path, labels: list[str]) -> None:
    (folder / "labels.txt").write_text("\n".join(labels) + "\n")


def _preprocessing(folder: Path, **changes) -> None:
    manifest = read_manifest(folder / MANIFEST_FILE)
    _rewrite(folder, preprocessing=manifest.preprocessing.model_copy(update=changes))


STRUCTURE = Structure(
    family="timm-vit", layers=6, grid=(7, 7), patch_size=(4, 4), prefix_tokens=(), pooling="avg", width=128, heads=4
)


def _other_structure(folder: Path) -> Structure:
    """A structure other than the manifest's (which may have none)."""
    current = read_manifest(folder / MANIFEST_FILE).structure
    return STRUCTURE if current is None else current.model_copy(update={"family": "another-adapter"})


# Each changes one thing a re-registration can change that alters results.
CHANGES_RESULTS = {
    "labels renamed": lambda f: _labels(f, [*read_labels(f)[:-1], "Boots"]),
    "labels reordered": lambda f: _labels(f, [read_labels(f)[1], read_labels(f)[0], *read_labels(f)[2:]]),
    "mean": lambda f: _preprocessing(f, mean=(0.5,)),
    "std": lambda f: _preprocessing(f, std=(0.5,)),
    "interpolation": lambda f: _preprocessing(f, interpolation="bicubic"),
    "model_args": lambda f: _rewrite(f, model_args={**read_manifest(f / MANIFEST_FILE).model_args, "qkv_bias": False}),
    "architecture": lambda f: _rewrite(f, architecture="vit_small_patch16_224"),
    "framework": lambda f: _rewrite(f, framework="transformers"),
    "structure": lambda f: _rewrite(f, structure=_other_structure(f)),
    "weights": lambda f: _rewrite(
        f,
        artifacts={
            "weights": read_manifest(f / MANIFEST_FILE).weights.model_copy(update={"sha256": "0" * 64}),
        },
    ),
}


def read_labels(folder: Path) -> list[str]:
    return (folder / "labels.txt").read_text().splitlines()


@pytest.mark.parametrize("change", sorted(CHANGES_RESULTS))
def test_whatever_changes_a_result_changes_the_fingerprint(original, tmp_path, change):
    folder = _copy(tmp_path / "changed")
    CHANGES_RESULTS[change](folder)
    assert _entry(folder).result_fingerprint != original.result_fingerprint, change


def test_the_same_weights_under_another_name_or_version_have_their_own_results(original, tmp_path):
    # A result names its model (ModelRef), so one computed for another name must not answer.
    renamed = _entry(_copy(tmp_path / "renamed", name="fmnist-copy"))
    other_version = _entry(_copy(tmp_path / "v9", version="9"))
    assert renamed.manifest.weights.sha256 == original.manifest.weights.sha256
    fingerprints = {original.result_fingerprint, renamed.result_fingerprint, other_version.result_fingerprint}
    assert len(fingerprints) == 3


UNCHANGED_RESULTS = {
    "description": lambda f: _rewrite(f, description="better words"),
    "metrics": lambda f: _rewrite(f, metrics=[Metric(name="top1", value=0.5, dataset="d", command="c")]),
    "provenance": lambda f: _rewrite(
        f, provenance=read_manifest(f / MANIFEST_FILE).provenance.model_copy(update={"notes": "retold"})
    ),
    "preprocessing source": lambda f: _preprocessing(f, source={"input_size": [1, 28, 28]}),
    "onnx explainer graph": lambda f: _rewrite(
        f,
        artifacts={
            **read_manifest(f / MANIFEST_FILE).artifacts,
            "onnx_explainer": Artifact(file="explainer.onnx", format="onnx", sha256="1" * 64, size=10),
        },
    ),
}


@pytest.mark.parametrize("change", sorted(UNCHANGED_RESULTS))
def test_what_changes_no_result_leaves_the_fingerprint(original, tmp_path, change):
    folder = _copy(tmp_path / "changed")
    UNCHANGED_RESULTS[change](folder)
    assert _entry(folder).result_fingerprint == original.result_fingerprint, change


def test_the_input_size_is_covered(original, tmp_path):
    folder = _copy(tmp_path / "changed")
    manifest = read_manifest(folder / MANIFEST_FILE)
    _rewrite(
        folder,
        input=manifest.input.model_copy(update={"height": 32, "width": 32}),
        preprocessing=manifest.preprocessing.model_copy(update={"resize": (32, 32)}),
    )
    assert _entry(folder).result_fingerprint != original.result_fingerprint


def test_bumping_the_lens_version_retires_every_stored_result(original, tmp_path, monkeypatch):
    jobs = JobStore(SqliteStore(tmp_path / "store.sqlite3"), ttl_s=60, inflight_ttl_s=60)
    old_key = content_key(original.result_fingerprint, "image", PARAMETERS)
    jobs.put_result(old_key, b'{"old": true}')
    assert jobs.result(content_key(original.result_fingerprint, "image", PARAMETERS)) == b'{"old": true}'

    monkeypatch.setattr(contract, "LENS_VERSION", contract.LENS_VERSION + 1)
    new_key = content_key(original.result_fingerprint, "image", PARAMETERS)
    assert new_key != old_key
    assert jobs.result(new_key) is None  # an explanation of the new method is computed afresh
    submitted = jobs.submit(
        kind="explanation", model="m@1", parameters=PARAMETERS, key=new_key, image_key="image", enqueue=lambda job: None
    )
    assert submitted.outcome == "queued"
    assert content_key(original.result_fingerprint, "image", PARAMETERS) == new_key  # and stable at that version
