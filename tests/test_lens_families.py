"""Every model family the lens opens, through its adapter: the identities of docs/methods.md on each.

For every family and configuration (random initialisation, small where the architecture allows):
the pooled projection of the last layer equals the model's logits within 1e-4, and the
pre-norm identity ``x_b = x_{b-1} + a_b + m_b`` holds. Then one explain call runs through the
adapter, and the gradient map is finite and nonzero. Unsupported configurations are refused
with a message naming what and why.
"""

from __future__ import annotations

import pytest
import timm
import torch
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    ViTConfig,
    ViTForImageClassification,
)

from classlens.core.contract import ExplainRequest, ModelRef
from worker.lens.adapter import UnsupportedModelError
from worker.lens.explain import explain
from worker.lens.families import describe, open_model
from worker.lens.gradient import gradient_relevance
from worker.lens.projection import ClassProjection, ProjectionSettings

REF = ModelRef(name="random", version="0", weights_sha256="0" * 64)
SMALL = dict(img_size=32, patch_size=8, depth=3, embed_dim=48, num_heads=2, num_classes=7)


def _hf_vit(cls, config_cls, **extra):
    torch.manual_seed(0)
    config = config_cls(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=96,
        num_labels=7,
        attn_implementation="eager",
        **extra,
    )
    return cls(config).eval()


def _timm(name, **arguments):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **arguments).eval()


# name: (builder, family, prefix tokens, pooling, norm before pooling)
MODELS = {
    "vit_base_patch16_gap_224 (norm before the mean)": (
        lambda: _timm("vit_base_patch16_gap_224", num_classes=10),
        "timm-vit",
        (),
        "avg",
        True,
    ),
    "CLS with fc_norm=True": (
        lambda: _timm("vit_tiny_patch16_224", fc_norm=True, **SMALL),
        "timm-vit",
        ("cls",),
        "token",
        False,
    ),
    "GAP with fc_norm (timm default)": (
        lambda: _timm("vit_tiny_patch16_224", global_pool="avg", class_token=False, **SMALL),
        "timm-vit",
        (),
        "avg",
        False,
    ),
    "max pooling, norm before": (
        lambda: _timm("vit_tiny_patch16_224", global_pool="max", fc_norm=False, **SMALL),
        "timm-vit",
        ("cls",),
        "max",
        True,
    ),
    "avgmax pooling with fc_norm": (
        lambda: _timm("vit_tiny_patch16_224", global_pool="avgmax", **SMALL),
        "timm-vit",
        ("cls",),
        "avgmax",
        False,
    ),
    "no final norm": (
        lambda: _timm("vit_tiny_patch16_224", final_norm=False, **SMALL),
        "timm-vit",
        ("cls",),
        "token",
        False,
    ),
    "registers and GAP": (
        lambda: _timm("vit_tiny_patch16_224", reg_tokens=2, global_pool="avg", class_token=False, **SMALL),
        "timm-vit",
        ("reg0", "reg1"),
        "avg",
        False,
    ),
    "DeiT distilled": (
        lambda: _timm("deit_tiny_distilled_patch16_224", **SMALL),
        "timm-vit",
        ("cls", "dist"),
        "token",
        False,
    ),
    "EVA-02 tiny (rope, SwiGLU)": (
        lambda: _timm("eva02_tiny_patch14_224", num_classes=10),
        "timm-eva",
        ("cls",),
        "avg",
        False,
    ),
    "Eva with CLS pooling": (
        lambda: _timm("eva02_tiny_patch14_224", img_size=56, num_classes=5, global_pool="token", use_fc_norm=False),
        "timm-eva",
        ("cls",),
        "token",
        False,
    ),
    "transformers ViT": (
        lambda: _hf_vit(ViTForImageClassification, ViTConfig),
        "transformers-vit",
        ("cls",),
        "token",
        False,
    ),
    "transformers DeiT": (
        lambda: _hf_vit(DeiTForImageClassification, DeiTConfig),
        "transformers-vit",
        ("cls", "dist"),
        "token",
        False,
    ),
    "transformers DeiT with teacher": (
        lambda: _hf_vit(DeiTForImageClassificationWithTeacher, DeiTConfig),
        "transformers-vit",
        ("cls", "dist"),
        "token",
        False,
    ),
}


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    build, family, prefix, pooling, before = MODELS[request.param]
    model = build()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, family, prefix, pooling, before


def _images(lens, batch=2):
    return torch.randn(batch, *lens.input_shape, generator=torch.Generator().manual_seed(1))


def test_the_adapter_reads_the_model(case):
    model, family, prefix, pooling, before = case
    lens = open_model(model)
    assert lens.family == family
    assert lens.spec.prefix_tokens == prefix
    assert lens.spec.pooling == pooling
    assert lens.norm_before_pool is before
    structure = describe(model)
    assert structure.layers == lens.spec.depth
    assert structure.grid == lens.spec.grid


def test_pooled_last_layer_projection_equals_the_logits_and_blocks_add_up(case):
    model, *_ = case
    lens = open_model(model)
    images = _images(lens)
    spec = lens.spec
    with torch.no_grad():
        run = lens.trace(images)
        pooled = ClassProjection(lens).pooled(run.residual[:, -1])
    tokens = spec.num_prefix + spec.num_image_tokens
    assert run.residual.shape == (2, spec.depth + 1, tokens, spec.width)
    assert run.attention is not None
    assert run.mlp is not None
    assert (pooled - run.logits).abs().max() < 1e-4
    # The pre-norm block: x_b = x_{b-1} + a_b + m_b.
    assert torch.allclose(run.residual[:, 1:], run.residual[:, :-1] + run.attention + run.mlp, atol=1e-5)


def test_norm_before_the_mean_makes_the_logits_the_mean_of_per_token_projections():
    """docs/methods.md: with the final norm inside the mean, the identity holds per token, exactly."""
    model = MODELS["vit_base_patch16_gap_224 (norm before the mean)"][0]()
    lens = open_model(model)
    projection = ClassProjection(lens)
    with torch.no_grad():
        run = lens.trace(_images(lens, batch=1), sublayers=False)
        per_token = projection(run.residual[:, -1]).mean(dim=1)
    assert (per_token - run.logits).abs().max() < 1e-4


def test_explain_and_gradient_map_run_through_every_adapter(case):
    model, *_ = case
    lens = open_model(model)
    images = _images(lens)
    labels = [f"class {i}" for i in range(lens.spec.num_classes)]
    request = ExplainRequest(top_k=2, layers=[0, lens.spec.depth], gradient_map=True)
    results = explain(model, images, labels, request, REF)
    assert len(results) == 2
    for result, logits in zip(results, lens.logits(images), strict=True):
        assert result.prediction[0].index == int(logits.argmax())
        top = result.targets[0]
        assert top.rank == 0
        assert top.pooled_ranks[-1] == 0  # the pooled last layer is the model's own read-out
        assert top.gradient_map is not None
        assert len(top.projection_maps) == 2
    projection = ClassProjection(lens)
    gradient = gradient_relevance(images, torch.tensor([[0, 1], [2, 3]]), projection)
    assert gradient.shape == (2, 2, lens.spec.num_image_tokens)
    assert torch.isfinite(gradient).all()
    assert gradient.abs().max() > 0


def test_cached_scale_projection_matches_the_logits_at_the_last_layer(case):
    model, *_ = case
    lens = open_model(model)
    if not isinstance(lens.final_norm, torch.nn.LayerNorm):
        with pytest.raises(UnsupportedModelError, match="cached-scale projection needs a LayerNorm"):
            ClassProjection(lens, ProjectionSettings(norm="cached"))
        return
    with torch.no_grad():
        run = lens.trace(_images(lens), sublayers=False)
        last = run.residual[:, -1]
        pooled = ClassProjection(lens, ProjectionSettings(norm="cached")).pooled(last, last)
    assert (pooled - run.logits).abs().max() < 1e-4


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: _timm("resnet18", num_classes=3), "nor any other model family the class-embedding lens opens"),
        (lambda: _timm("vit_tiny_patch16_224", global_pool="map", **SMALL), "attention-pooling"),
        (lambda: _timm("vit_tiny_patch16_224", dynamic_img_size=True, **SMALL), "dynamic image size"),
        (lambda: _timm("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8), "one linear layer"),
        (
            lambda: _timm("vit_relpos_small_patch16_224", img_size=32, num_classes=3),
            "nor any other model family the class-embedding lens opens",
        ),
        (lambda: _timm("eva02_tiny_patch14_224", img_size=56, num_classes=3, use_post_norm=True), "post-norm"),
    ],
)
def test_unsupported_configurations_are_refused_with_the_reason(build, message):
    with pytest.raises(UnsupportedModelError, match=message):
        open_model(build())
