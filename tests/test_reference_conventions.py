"""The paper's conventions (github.com/martinagvilas/vit-cls_emb) beside the project's, each named in ``data``.

Every reference option is checked against a re-implementation written here line by line after
the paper's code (``src/memories.py``, ``src/extractor.py``, ``src/identifiability.py``,
``src/models/vit_edited.py``), on a small random timm ViT; the kinds are run on a registered
random ViT with a CLS token (``tiny-vit``) to check that their results name the convention used.
"""

import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from pydantic import ValidationError

from classlens.cli import main
from classlens.core.contract import AnalysisRequest
from model_store.catalog import BUNDLED_SAMPLES, Catalog
from tests.service_fixtures import TINY_MODEL
from worker.analyses.memories import image_agreement, reference_scores
from worker.analyses.perturbation import perturbation_effects
from worker.analyses.residual import categorical_updates, mlp_only_share, residual_composition
from worker.analyses.run import run_analysis
from worker.lens.vit import trace
from worker.random_models import random_vit
from worker.runtime import load

CLASSES = 10


@pytest.fixture(scope="module")
def vit():
    """Depth 2, width 32, a 7x7 grid, 10 classes, a CLS token."""
    model = random_vit(
        "vit_tiny_patch16_224",
        seed=3,
        img_size=28,
        patch_size=4,
        in_chans=1,
        depth=2,
        embed_dim=32,
        num_heads=2,
        mlp_ratio=2.0,
        num_classes=CLASSES,
    )
    with torch.no_grad():  # timm's init (std 0.02, a CLS token near 0) makes attention nearly uniform: sharpen it
        model.cls_token.normal_(0.0, 1.0)
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, module.in_features**-0.5)
    return model


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(6, 1, 28, 28)


CLASSES_OF = torch.tensor([0, 3, 3, 7, 9, 1])


# --- the paper's definitions, written as its code computes them -----------------------------------------


def reference_keys(model, images, layer_type):
    """Per block, ``key_val`` as src/extractor.py saves it: the fc1 output, or ``attn-w @ value`` of the attention."""
    captured = {}
    handles = []
    for b, block in enumerate(model.blocks):
        if layer_type == "mlp":
            hook = lambda module, inputs, output, b=b: captured.__setitem__(b, output)  # noqa: E731
            handles.append(block.mlp.fc1.register_forward_hook(hook))
        else:
            hook = lambda module, inputs, output, b=b: captured.__setitem__(b, inputs[0])  # noqa: E731
            handles.append(block.attn.register_forward_hook(hook))
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    if layer_type == "mlp":
        return [captured[b] for b in range(len(model.blocks))]
    keys = []
    for b, block in enumerate(model.blocks):
        x, attn = captured[b], block.attn
        B, N, C = x.shape
        with torch.no_grad():
            qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            attn_data = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
            key_val = attn_data @ v
        keys.append(key_val.transpose(1, 2).reshape(B, N, C))
    return keys


def reference_agreement(model, images, classes, layer_type):
    """``[B, L]``: src/memories.py's compute_key_value_agreement, then compute_key_value_agr_rate(tokens='all')."""
    rates = []
    for block, key_val in zip(model.blocks, reference_keys(model, images, layer_type), strict=True):
        weight = block.mlp.fc2.weight if layer_type == "mlp" else block.attn.proj.weight
        with torch.no_grad():
            val_proj = model.head.weight @ weight
        key_topk = val_proj.topk(5, dim=1)[1]
        hs_key_topk = key_val.topk(5, dim=-1)[1]
        agr = torch.stack([torch.any(torch.isin(hs_key_topk[i], key_topk[c]), dim=-1) for i, c in enumerate(classes)])
        agr = agr.flatten(start_dim=1)
        rates.append(torch.sum(agr, dim=1) / agr.shape[1])
    return torch.stack(rates, dim=1).double()


def normalised_agreement(model, images, classes, layer_type):
    """``[B, L]``: top-5 values by cos(E_g[c], v_k) (E times the final norm's gain, rows centred), image tokens only."""
    with torch.no_grad():
        directions = model.head.weight.double() * model.norm.weight.double()
        directions = directions - directions.mean(dim=1, keepdim=True)
        directions = directions / directions.norm(dim=1, keepdim=True)
    rates = []
    for block, key_val in zip(model.blocks, reference_keys(model, images, layer_type), strict=True):
        weight = (block.mlp.fc2.weight if layer_type == "mlp" else block.attn.proj.weight).detach().double()
        values = weight / weight.norm(dim=0, keepdim=True)
        key_topk = (directions @ values).topk(5, dim=1)[1]
        hs_key_topk = key_val[:, 1:].topk(5, dim=-1)[1]
        agr = torch.stack([torch.isin(hs_key_topk[i], key_topk[c]).any(dim=-1) for i, c in enumerate(classes)])
        rates.append(agr.double().mean(dim=1))
    return torch.stack(rates, dim=1)


def class_logits(model, hidden):
    """src/extractor.py: ``preds = cls_proj(ln(l_repr))``."""
    with torch.no_grad():
        return model.head(model.norm(hidden))


def reference_stream(model, images):
    """Per block: its input ``hs_{b-1}``, attention output, MLP output (``hs-mlp_b``) and output ``hs_b``."""
    captured = {"input": [], "attn": [], "mlp": [], "output": []}
    handles = []
    for block in model.blocks:
        handles.append(block.register_forward_hook(lambda m, i, o: captured["output"].append(o)))
        handles.append(block.register_forward_pre_hook(lambda m, i: captured["input"].append(i[0])))
        handles.append(block.attn.register_forward_hook(lambda m, i, o: captured["attn"].append(o)))
        handles.append(block.mlp.register_forward_hook(lambda m, i, o: captured["mlp"].append(o)))
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    return captured


def reference_change_rate(model, images, classes, layer_type):
    """``[L]``: plot_class_building's change rate, ``sum(dec_layer - dec > 0) / n``, over image tokens."""
    stream = reference_stream(model, images)
    rates = []
    for b in range(len(model.blocks)):
        dec_layer = class_logits(model, stream[layer_type][b])[torch.arange(len(classes)), :, classes]
        dec = class_logits(model, stream["input"][b])[torch.arange(len(classes)), :, classes]
        diff_img = (dec_layer - dec)[:, 1:]
        rates.append(torch.sum(diff_img > 0) / diff_img.flatten().shape[0])
    return torch.stack(rates).double()


def reference_composed(model, images):
    """``[L]``: compute_residual_match's ``comp`` share, as written (a_b tested twice, m_b never), image tokens."""
    stream = reference_stream(model, images)
    shares = []
    for b in range(len(model.blocks)):
        topk_b = class_logits(model, stream["output"][b])[:, 1:].topk(5, dim=-1)[1][:, :, 0]
        topk_attn = class_logits(model, stream["attn"][b])[:, 1:].topk(5, dim=-1)[1][:, :, 0]
        topk_prev = class_logits(model, stream["input"][b])[:, 1:].topk(5, dim=-1)[1][:, :, 0]
        comp_tokens = (topk_b != topk_prev) & (topk_b != topk_attn) & (topk_b != topk_attn)
        shares.append(torch.sum(comp_tokens) / topk_b.flatten().shape[0])
    return torch.stack(shares).double()


def reference_no_cls_identifiability(model, images, targets):
    """``[L + 1]``: vit_edited.py's Attention with ``perturb='no_cls'`` in every block, then 1 - rank / C per layer."""
    with torch.no_grad():
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        layers = [x]
        for block in model.blocks:
            h, attn = block.norm1(x), block.attn
            B, N, C = h.shape
            qkv = attn.qkv(h).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            weights = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
            for t in range(1, weights.shape[-1]):
                weights[:, :, t, 0] = 0
            a = attn.proj((weights @ v).transpose(1, 2).reshape(B, N, C))
            x = x + block.ls1(a)
            x = x + block.ls2(block.mlp(block.norm2(x)))
            layers.append(x)
    curves = []
    for hidden in layers:
        logits = class_logits(model, hidden)[:, 1:]  # [B, N, C]
        own = logits[torch.arange(len(targets)), :, targets][..., None]
        rank = (logits > own).sum(dim=-1)
        curves.append((1 - rank / logits.shape[-1]).double().mean())
    return torch.stack(curves)


# --- the library against them ------------------------------------------------------------------------------


@pytest.mark.parametrize("layer_type", ["mlp", "attention"])
def test_reference_agreement_is_the_papers(vit, images, layer_type):
    scores = {layer_type: reference_scores(vit, layer_type)}
    agreement = image_agreement(vit, scores, [(images[:4], CLASSES_OF[:4]), (images[4:], CLASSES_OF[4:])], "all")
    expected = reference_agreement(vit, images, CLASSES_OF, "mlp" if layer_type == "mlp" else "attn")
    assert agreement.shares[layer_type].shape == (6, 2)
    assert torch.allclose(agreement.shares[layer_type], expected)
    assert torch.equal(agreement.labels, CLASSES_OF)


@pytest.mark.parametrize("layer_type", ["mlp", "attention"])
def test_normalised_agreement_counts_image_tokens_with_the_class_directions(vit, images, layer_type):
    from worker.analyses.memories import attention_value_scores, memory_scores

    scores = memory_scores(vit) if layer_type == "mlp" else attention_value_scores(vit)
    agreement = image_agreement(vit, {layer_type: scores}, [(images, CLASSES_OF)])
    expected = normalised_agreement(vit, images, CLASSES_OF, "mlp" if layer_type == "mlp" else "attn")
    assert torch.allclose(agreement.shares[layer_type], expected)


def test_the_conventions_choose_different_values(vit):
    from worker.analyses.memories import memory_scores

    normalised = memory_scores(vit).topk(5, dim=-1).indices.sort(dim=-1).values
    reference = reference_scores(vit, "mlp").topk(5, dim=-1).indices.sort(dim=-1).values
    assert not torch.equal(normalised, reference)


def test_agreement_without_labels_is_of_the_prediction_and_knows_no_correctness(vit, images):
    agreement = image_agreement(vit, {"mlp": reference_scores(vit, "mlp")}, [(images, None)], "all")
    with torch.no_grad():
        predicted = vit(images).argmax(dim=-1)
    assert agreement.correct is None
    assert torch.equal(agreement.predictions, predicted)
    assert torch.allclose(agreement.shares["mlp"], reference_agreement(vit, images, predicted, "mlp"))


def test_the_mlp_update_share_is_the_papers_and_the_mean_is_unchanged(vit, images):
    updates = categorical_updates(vit, images, CLASSES_OF)
    assert torch.allclose(updates["mlp_rises"], reference_change_rate(vit, images, CLASSES_OF, "mlp"))
    assert torch.allclose(updates["attention_rises"], reference_change_rate(vit, images, CLASSES_OF, "attn"))
    stream = reference_stream(vit, images)
    middle = [stream["input"][b] + stream["attn"][b] for b in range(2)]  # x' (no layer scale in this model)
    mean = [
        (class_logits(vit, stream["mlp"][b]) - class_logits(vit, middle[b]))[torch.arange(6), 1:, CLASSES_OF].mean()
        for b in range(2)
    ]
    assert torch.allclose(updates["mlp_update"], torch.stack(mean).double(), atol=1e-5)


def test_composition_is_fixed_and_the_reference_share_is_composed_plus_mlp_only(vit, images):
    shares = residual_composition(vit, images)
    stream = reference_stream(vit, images)
    fixed = []
    for b in range(2):
        top = {name: class_logits(vit, stream[name][b])[:, 1:].argmax(dim=-1) for name in stream}
        matches = (top["output"] == top["attn"]) | (top["output"] == top["mlp"]) | (top["output"] == top["input"])
        fixed.append((~matches).double().mean())
    assert torch.allclose(shares["composed"], torch.stack(fixed))
    assert torch.allclose(shares["composed"] + mlp_only_share(vit, images), reference_composed(vit, images))


def test_zeroing_the_cls_column_after_the_softmax_is_the_papers_no_cls(vit, images):
    batches = [(images, CLASSES_OF)]
    fused = [block.attn.fused_attn for block in vit.blocks]
    zero = perturbation_effects(vit, batches, no_cls="zero")["curves"]["no-cls"]
    assert torch.allclose(zero, reference_no_cls_identifiability(vit, images, CLASSES_OF))
    pre_softmax = perturbation_effects(vit, batches)["curves"]["no-cls"]
    assert not torch.allclose(zero, pre_softmax, atol=1e-3)
    assert not any(block.attn.attn_drop._forward_hooks for block in vit.blocks)
    assert [block.attn.fused_attn for block in vit.blocks] == fused


def test_zero_renormalised_is_pre_softmax_written_the_other_way(vit, images):
    from worker.analyses.perturbation import no_cls_attention
    from worker.lens.vit import inspect_vit

    spec = inspect_vit(vit)
    with torch.no_grad():
        with no_cls_attention(vit, spec, "pre_softmax"):
            masked = trace(vit, images, sublayers=False)
        with no_cls_attention(vit, spec, "zero_renormalised"):
            renormalised = trace(vit, images, sublayers=False)
        with no_cls_attention(vit, spec, "zero"):
            zeroed = trace(vit, images, sublayers=False)
    assert torch.allclose(masked.residual, renormalised.residual, atol=1e-5)
    assert not torch.allclose(masked.residual, zeroed.residual, atol=1e-3)


# --- the kinds name the convention in data, the API and the CLI take the options ---------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model_root):
    """``tiny-vit@1``: a registered random 2-block ViT with a CLS token (tests/service_fixtures.py)."""
    return load(Catalog([tiny_model_root]).resolve(f"{TINY_MODEL}@1"), torch.device("cpu"), require_vit=False)


@pytest.fixture(scope="module")
def samples():
    with (BUNDLED_SAMPLES / "labels.csv").open() as stream:
        rows = list(csv.DictReader(stream))[:4]
    images = [Image.open(BUNDLED_SAMPLES / row["file"]).convert("L") for row in rows]
    return images, np.array([int(row["label_index"]) for row in rows])


def analyse(kind, loaded, samples, labels, **fields):
    images, _ = samples
    outcome = run_analysis(
        AnalysisRequest(kind=kind, batch_size=4, **fields), [loaded], images, labels, lambda *_: None
    )
    json.dumps(outcome.data, allow_nan=False)
    return outcome


def test_memories_in_the_reference_convention_split_by_correctness(tiny, samples):
    images, _ = samples
    model, batch = tiny.network, tiny.preprocess(images)
    with torch.no_grad():
        predicted = model(batch).argmax(dim=-1)
    labels = predicted.numpy().copy()
    labels[:2] = (labels[:2] + 1) % CLASSES  # two images misclassified, two right
    outcome = analyse("memories", tiny, samples, labels, agreement="reference")
    data = outcome.data
    assert data["agreement"] == "reference"
    assert "unnormalised head.weight @ fc2.weight" in data["agreement_convention"]
    assert data["agreement_tokens"] == "all"
    classes = torch.as_tensor(labels)
    mlp = reference_agreement(model, batch, classes, "mlp")
    attention = reference_agreement(model, batch, classes, "attn")
    assert np.allclose(data["mlp"]["trained"]["key_value_agreement"], mlp.mean(dim=0).numpy(), atol=1e-4)
    assert np.allclose(data["attention"]["trained"]["key_value_agreement"], attention.mean(dim=0).numpy(), atol=1e-4)
    groups = data["by_correctness"]
    assert (groups["correct"]["images"], groups["misclassified"]["images"]) == (2, 2)
    assert np.allclose(groups["correct"]["mlp"], mlp[2:].mean(dim=0).numpy(), atol=1e-4)
    assert np.allclose(groups["misclassified"]["attention"], attention[:2].mean(dim=0).numpy(), atol=1e-4)
    assert {"memories_attention", "memories_correctness"} <= set(outcome.figures)


def test_memories_default_names_its_convention_and_has_no_split_without_labels(tiny, samples):
    outcome = analyse("memories", tiny, samples, None)
    assert outcome.data["agreement"] == "normalised"
    assert outcome.data["agreement_tokens"] == "image"
    assert outcome.data["by_correctness"] is None
    assert "memories_correctness" not in outcome.figures
    assert len(outcome.data["attention"]["trained"]["key_value_agreement"]) == 2


def test_perturb_names_its_no_cls_convention(tiny, samples):
    _, truth = samples
    perturb = analyse("perturb", tiny, samples, truth, no_cls="zero").data
    assert perturb["no_cls"] == "zero"
    assert "not renormalised" in perturb["no_cls_convention"]
    assert set(perturb["identifiability"]) == {"original", "self_only", "no_cls", "context", "context_original"}


def test_residual_names_its_conventions_and_gives_the_papers_statistics(tiny, samples):
    images, truth = samples
    residual = analyse("residual", tiny, samples, truth).data
    assert "fixed" in residual["conventions"]["composition_composed"]
    assert "reference" in residual["conventions"]["update_mlp_rises"]
    batch = tiny.preprocess(images)
    expected = reference_change_rate(tiny.network, batch, torch.as_tensor(truth), "mlp")
    assert np.allclose(residual["update_mlp_rises"], expected.numpy(), atol=1e-4)
    composed = np.add(residual["composition_composed"], residual["composition_mlp_only"])
    assert np.allclose(composed, reference_composed(tiny.network, batch).numpy(), atol=1e-3)


def test_the_request_takes_the_options_with_the_project_defaults():
    request = AnalysisRequest(kind="memories")
    assert (request.agreement, request.no_cls) == ("normalised", "pre_softmax")
    assert AnalysisRequest(kind="perturb", no_cls="zero_renormalised").no_cls == "zero_renormalised"
    with pytest.raises(ValidationError):
        AnalysisRequest(kind="memories", agreement="raw")
    with pytest.raises(ValidationError):
        AnalysisRequest(kind="perturb", no_cls="post_softmax")


def test_the_api_reads_the_options_from_form_fields():
    from werkzeug.datastructures import MultiDict

    from service.routes.analyses import form_parameters

    fields = form_parameters(MultiDict({"kind": "memories", "agreement": "reference", "no_cls": "zero"}))
    assert AnalysisRequest.model_validate(fields).model_dump(include={"agreement", "no_cls"}) == {
        "agreement": "reference",
        "no_cls": "zero",
    }


@pytest.mark.integration  # the CLI reads Fashion-MNIST test images
def test_the_cli_passes_the_options_to_the_worker(tmp_path, tiny_model_root):
    def cli(*args):
        return CliRunner().invoke(main, ["analyze", *args], env={"CLASSLENS_MODEL_DIRS": str(tiny_model_root)})

    result = cli("perturb", "--model", TINY_MODEL, "--images", "4", "--no-cls", "zero", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "perturb.json").read_text())["data"]["no_cls"] == "zero"
    refused = cli("memories", "--model", TINY_MODEL, "--agreement", "raw")
    assert refused.exit_code == 2
    assert "normalised" in refused.output
    assert "reference" in refused.output
