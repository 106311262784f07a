"""A post-norm ViT (timm ``ResPostBlock``, the paper's GAP family) as users bring one: saved by timm,
registered with ``classlens models add``, explained, and analysed.

The model is timm's ``vit_base_patch16_rpn_224`` layout shrunk to 32x32 images, random weights,
written by timm's own ``save_for_hf`` (safetensors). Nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models import save_for_hf

import worker  # noqa: F401  (torchvision compatibility before timm)
from classlens.core.contract import AnalysisRequest, Explanation
from model_store.catalog import Catalog
from worker.analyses.run import AnalysisError, run_analysis
from worker.lens.projection import ClassProjection
from worker.lens.vit import inspect_vit, trace
from worker.model_loader import logits_of
from worker.random_models import random_vit
from worker.runtime import load

LABELS = ["cat", "dog", "bird", "fish"]
ARGS = {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 48, "num_heads": 2, "num_classes": 4}


def post_norm_vit() -> torch.nn.Module:
    model = random_vit("vit_base_patch16_rpn_224", seed=0, **ARGS)
    with torch.no_grad():  # timm starts the block norms at 1e-5: give them gains a trained model could have
        for block in model.blocks:
            block.norm1.weight.uniform_(0.5, 1.5)
            block.norm2.weight.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """The model, its folder, and its catalog entry, registered once for the module's tests."""
    from click.testing import CliRunner

    from classlens.cli import main

    work = tmp_path_factory.mktemp("post-norm")
    model = post_norm_vit()
    folder = work / "rpn-hub"
    save_for_hf(model, folder, model_config={"label_names": LABELS}, safe_serialization=True)
    runner = CliRunner(env={"CLASSLENS_DATA_DIR": str(work / "data"), "CLASSLENS_MODEL_DIRS": ""})

    def cli(*args):
        result = runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    assert "registered " in cli("models", "add", folder)
    entry = Catalog([work / "data" / "models"]).resolve("rpn-hub")
    return model, entry, cli, work


def _pictures(count=6):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "RGB") for _ in range(count)]


def test_the_registered_post_norm_model_explains_end_to_end(registered):
    model, entry, cli, work = registered
    assert entry.manifest.architecture == "vit_base_patch16_rpn_224"
    assert entry.manifest.structure is not None
    assert entry.manifest.structure.family == "timm-vit"
    assert entry.manifest.structure.pooling == "avg"
    loaded = load(entry, torch.device("cpu"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(logits_of(loaded.network(x)), model(x), atol=1e-5)
        run = trace(loaded.network, x)
        pooled = ClassProjection(loaded.network).pooled(run.residual[:, -1])
    assert inspect_vit(loaded.network).post_norm
    assert (pooled - run.logits).abs().max() < 1e-4
    assert torch.allclose(run.residual[:, 1:], run.residual[:, :-1] + run.attention + run.mlp, atol=1e-5)

    photo = work / "photo.png"
    _pictures(1)[0].save(photo)
    out = work / "out"
    cli("explain", photo, "--model", "rpn-hub", "--top-k", "2", "--gradient-map", "--out", out)
    explanation = Explanation.model_validate_json((out / "photo.json").read_text())
    top = explanation.targets[0]
    assert top.label in LABELS
    assert top.pooled_ranks[-1] == 0  # the pooled last layer is the model's own read-out
    assert top.gradient_map is not None
    assert np.isfinite(np.asarray(top.gradient_map)).all()


@pytest.mark.parametrize(
    ("kind", "keys"),
    [
        ("attention-distance", {"distances", "mean_per_block"}),
        ("skip-ratio", {"attention_image", "mlp_image"}),
        ("perturb", {"identifiability", "region"}),
        ("residual", {"update_rises", "composition_composed"}),
    ],
)
def test_analyses_that_open_the_blocks_run_on_the_post_norm_model(registered, kind, keys):
    _, entry, _, _ = registered
    loaded = load(entry, torch.device("cpu"), require_vit=False)
    outcome = run_analysis(AnalysisRequest(kind=kind, batch_size=4), [loaded], _pictures(), np.arange(6) % 4)
    assert keys <= set(outcome.data)
    assert outcome.figures


def test_memories_are_refused_on_post_norm_blocks_with_the_reason(registered):
    _, entry, _, _ = registered
    loaded = load(entry, torch.device("cpu"), require_vit=False)
    with pytest.raises(AnalysisError, match="post-norm blocks, which normalise the MLP output"):
        run_analysis(AnalysisRequest(kind="memories", batch_size=4), [loaded], _pictures(), np.arange(6) % 4)


def test_the_explainer_graph_runs_post_norm_blocks_as_the_model_does():
    """The ONNX explainer graph's block-by-block pass (run here in torch, not exported) equals the traced pass."""
    from worker.onnx_export import ExplainerGraph

    model = post_norm_vit()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, residual, centred_residual, centred_attention, centred_mlp, _ = ExplainerGraph(model)(images)
        run = trace(model, images)
        projection = ClassProjection(model)
        weight = projection.centred_embedding
    assert torch.allclose(logits, run.logits, atol=1e-5)
    assert torch.allclose(residual, run.residual, atol=1e-5)
    assert torch.allclose(centred_attention, run.attention @ weight.T, atol=1e-4)
    assert torch.allclose(centred_mlp, run.mlp @ weight.T, atol=1e-4)
    assert torch.allclose(centred_residual, run.residual @ weight.T, atol=1e-4)


def test_chefer_and_rollout_open_post_norm_blocks_and_grad_cam_says_why_it_cannot():
    from worker.lens.baselines import attention_rollout, chefer_relevance, grad_cam
    from worker.lens.vit import UnsupportedModelError

    model = post_norm_vit().eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[0, 1], [2, 3]])
    tokens = inspect_vit(model).num_image_tokens
    for method in (chefer_relevance, attention_rollout):
        maps = method(model, images, targets)
        assert maps.shape == (2, 2, tokens)
        assert torch.isfinite(maps).all()
    with pytest.raises(UnsupportedModelError, match="post-norm"):
        grad_cam(model, images, targets)
