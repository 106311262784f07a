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
import torch.nn.functional as F
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


def _post_norm(name, **arguments):
    """A post-norm ViT (timm ``ResPostBlock``) whose block norms have random gains and shifts.

    timm starts those norms at ``init_values`` (1e-5), which would make every sublayer tiny.
    """
    model = _timm(name, **{**SMALL, **arguments})
    with torch.no_grad():
        for block in model.blocks:
            for norm in (block.norm1, block.norm2):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.normal_(0.0, 0.1)
    return model


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
    "post-norm blocks, GAP with fc_norm (vit_base_patch16_rpn_224's layout)": (
        lambda: _post_norm("vit_base_patch16_rpn_224"),
        "timm-vit",
        (),
        "avg",
        False,
    ),
    "post-norm blocks, GAP with the norm before the mean": (
        lambda: _post_norm("vit_base_patch16_rpn_224", fc_norm=False),
        "timm-vit",
        (),
        "avg",
        True,
    ),
    "post-norm blocks with a CLS token": (
        lambda: _post_norm("vit_base_patch16_rpn_224", class_token=True, global_pool="token"),
        "timm-vit",
        ("cls",),
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


def _post_norm_by_hand(model, images, target):
    """A post-norm ViT's pass written out line by line (no lens, no hooks, no timm block code).

    Returns the logits, ``x_0 .. x_L``, ``a_b``, ``m_b`` and the gradient map of ``target``:
    ``-sum_b sum_h d l_b / d A_b[h, q, j]`` over image-token queries ``q`` (a GAP model) and
    image tokens ``j``, with ``l_b = cross_entropy(head(fc_norm(mean_j a_b[j])), target)``.
    Each block's input is cut from the graph, so ``l_b`` reaches ``A_b`` only through block ``b``.
    """
    width = model.embed_dim
    x = model.patch_embed(images) + model.pos_embed  # no class token: the position embedding covers N tokens
    residual, attention, mlp, probabilities, losses = [x], [], [], [], []
    for block in model.blocks:
        x = x.detach()
        batch, tokens, _ = x.shape
        heads = block.attn.num_heads
        qkv = F.linear(x, block.attn.qkv.weight, block.attn.qkv.bias).reshape(batch, tokens, 3, heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
        probs = scores.softmax(dim=-1).detach().requires_grad_(True)
        mixed = (probs @ v).transpose(1, 2).reshape(batch, tokens, width)
        out = F.linear(mixed, block.attn.proj.weight, block.attn.proj.bias)
        a = F.layer_norm(out, (width,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
        middle = x + a
        hidden = F.gelu(F.linear(middle, block.mlp.fc1.weight, block.mlp.fc1.bias))
        m = F.layer_norm(
            F.linear(hidden, block.mlp.fc2.weight, block.mlp.fc2.bias),
            (width,),
            block.norm2.weight,
            block.norm2.bias,
            block.norm2.eps,
        )
        x = middle + m
        pooled = F.layer_norm(a.mean(dim=1), (width,), model.fc_norm.weight, model.fc_norm.bias, model.fc_norm.eps)
        losses.append(F.cross_entropy(F.linear(pooled, model.head.weight, model.head.bias), target, reduction="sum"))
        residual.append(x)
        attention.append(a)
        mlp.append(m)
        probabilities.append(probs)
    grads = torch.autograd.grad(sum(losses), probabilities)
    relevance = -sum(g.sum(dim=(1, 2)) for g in grads)  # every query row is an image token's
    pooled = F.layer_norm(x.mean(dim=1), (width,), model.fc_norm.weight, model.fc_norm.bias, model.fc_norm.eps)
    logits = F.linear(pooled, model.head.weight, model.head.bias)
    return logits, torch.stack(residual, 1), torch.stack(attention, 1), torch.stack(mlp, 1), relevance


def test_post_norm_sublayers_are_the_block_norms_of_the_branch_outputs():
    """docs/methods.md: a post-norm block's sublayer is projected after the block's own norm.

    The lens's streams, stream logits and gradient map equal a line-by-line pass of the model.
    """
    model = _post_norm("vit_base_patch16_rpn_224")
    lens = open_model(model)
    assert lens.spec.post_norm
    images = _images(lens)
    target = torch.tensor([3, 5])
    with torch.enable_grad():
        logits, residual, attention, mlp, relevance = _post_norm_by_hand(model, images, target)
    with torch.no_grad():
        run = lens.trace(images)
        projection = ClassProjection(lens)
        streams = projection.streams(run.residual, run.attention, run.mlp)
    assert torch.allclose(run.logits, logits, atol=1e-5)
    assert torch.allclose(run.residual, residual, atol=1e-5)
    assert torch.allclose(run.attention, attention, atol=1e-5)
    assert torch.allclose(run.mlp, mlp, atol=1e-5)
    # z(a_b) per token: the head after fc_norm of the normalised branch output.
    norm, head = model.fc_norm, model.head
    by_hand = F.linear(
        F.layer_norm(attention, (model.embed_dim,), norm.weight, norm.bias, norm.eps), head.weight, head.bias
    )
    depth = lens.spec.depth
    assert torch.allclose(streams[:, depth + 1 : 2 * depth + 1], by_hand, atol=1e-4)
    gradient = gradient_relevance(images, target[:, None], projection)
    assert relevance.abs().max() > 0
    assert torch.allclose(gradient[:, 0], relevance, atol=1e-5, rtol=1e-4)


def test_post_norm_blocks_mixed_with_pre_norm_ones_are_refused():
    from timm.models.vision_transformer import ResPostBlock

    model = _timm("vit_tiny_patch16_224", **SMALL)
    model.blocks[1] = ResPostBlock(dim=48, num_heads=2)
    with pytest.raises(UnsupportedModelError, match="blocks are all of one kind"):
        open_model(model)
