"""The lens on random-initialised timm ViTs: identities, shapes, ranks, gradient map, errors."""

import dataclasses
import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from classlens.core.contract import ExplainRequest, Explanation, ModelRef
from worker import random_models
from worker.analyses.memories import class_directions
from worker.lens.adapter import recorded
from worker.lens.explain import ExplainError, explain, resolve_targets
from worker.lens.gradient import gradient_relevance
from worker.lens.projection import (
    CentredStreams,
    ClassProjection,
    ProjectionSettings,
    StreamLogits,
    centred_embedding,
)
from worker.lens.ranks import class_rank, emergence_layer, identifiability
from worker.lens.vit import UnsupportedModelError, inspect_vit, materialised_attention, trace

ARCHITECTURES = {
    # name: (timm arguments, expected prefix tokens, pooling)
    "vit_tiny_patch16_224": ({}, ("cls",), "token"),
    "deit_tiny_distilled_patch16_224": ({}, ("cls", "dist"), "token"),
    "vit_small_patch14_reg4_dinov2": (
        {"img_size": 112, "num_classes": 100},
        ("cls", "reg0", "reg1", "reg2", "reg3"),
        "token",
    ),
    "vit_wee_patch16_reg1_gap_256": ({"img_size": 128, "num_classes": 100}, ("reg0",), "avg"),
}
REF = ModelRef(name="random", version="0", weights_sha256="0" * 64)


def random_vit(name, **overrides):
    arguments = {**ARCHITECTURES[name][0], **overrides} if name in ARCHITECTURES else overrides
    return random_models.random_vit(name, **arguments)


def images_for(model, batch=2):
    channels = model.patch_embed.proj.in_channels
    return torch.randn(batch, channels, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(1))


def tiny_vit(**overrides):
    arguments = dict(img_size=32, patch_size=8, depth=3, embed_dim=48, num_heads=2, num_classes=7)
    return random_vit("vit_tiny_patch16_224", **{**arguments, **overrides})


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_last_layer_projection_of_the_pooled_representation_equals_the_logits(name):
    model = random_vit(name)
    images = images_for(model)
    spec = inspect_vit(model)
    _, prefix, pooling = ARCHITECTURES[name]
    assert spec.prefix_tokens == prefix
    assert spec.pooling == pooling
    with torch.no_grad():
        run = trace(model, images)
        logits = model(images)
        pooled = ClassProjection(model).pooled(run.residual[:, -1])
    assert torch.allclose(run.logits, logits, atol=1e-5)
    assert (pooled - logits).abs().max() < 1e-4

    tokens = spec.num_prefix + spec.grid[0] * spec.grid[1]
    assert spec.grid == tuple(s // p for s, p in zip(model.patch_embed.img_size, spec.patch_size, strict=True))
    assert run.residual.shape == (2, spec.depth + 1, tokens, spec.width)
    assert run.attention.shape == run.mlp.shape == (2, spec.depth, tokens, spec.width)
    # The pre-norm block: x_b = x_{b-1} + a_b + m_b, exactly.
    assert torch.allclose(run.residual[:, 1:], run.residual[:, :-1] + run.attention + run.mlp, atol=1e-5)


def test_gap_per_token_projections_do_not_average_to_the_logits():
    model = random_vit("vit_wee_patch16_reg1_gap_256")
    images = images_for(model)
    projection = ClassProjection(model)
    with torch.no_grad():
        run = trace(model, images, sublayers=False)
        per_token = projection(run.residual[:, -1, 1:]).mean(dim=1)
    assert (per_token - run.logits).abs().max() > 1e-3  # the norm is non-linear


def test_projection_variants():
    model = tiny_vit()
    images = images_for(model)
    with torch.no_grad():
        last = trace(model, images, sublayers=False).residual[:, -1]
        fresh = ClassProjection(model)(last)
        cached = ClassProjection(model, ProjectionSettings(norm="cached"))(last, last)
        no_bias = ClassProjection(model, ProjectionSettings(bias=False))(last)
        earlier = trace(model, images, sublayers=False).residual[:, 1]
        cached_earlier = ClassProjection(model, ProjectionSettings(norm="cached"))(earlier, last)
    # At the last layer the cached scale is the vector's own: both conventions agree.
    assert torch.allclose(fresh, cached, atol=1e-5)
    assert torch.allclose(fresh - no_bias, model.head.bias.expand_as(fresh), atol=1e-6)
    # Earlier layers: the conventions differ.
    assert (ClassProjection(model)(earlier) - cached_earlier).abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs the last layer"):
        ClassProjection(model, ProjectionSettings(norm="cached"))(earlier)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
@pytest.mark.parametrize("settings", [ProjectionSettings(), ProjectionSettings(norm="cached", bias=False)])
def test_all_streams_at_once_equal_projecting_each_stream(name, settings):
    model = random_vit(name)
    images = images_for(model)
    projection = ClassProjection(model, settings)
    with torch.no_grad():
        run = trace(model, images)
        last = run.residual[:, -1:]
        direct = torch.cat([projection(stream, last) for stream in (run.residual, run.attention, run.mlp)], dim=1)
        at_once = projection.streams(run.residual, run.attention, run.mlp)
        residual_only = projection.streams(run.residual)
    scale = direct.abs().amax(dim=-1, keepdim=True)  # per token: logits of sublayers can be tiny (LayerScale)
    assert at_once.shape == direct.shape
    assert ((at_once - direct).abs() / scale).max() < 1e-4
    assert torch.equal(residual_only, projection(run.residual, last))
    # Ranks agree wherever two logits are not within rounding of each other.
    targets = run.logits.topk(3).indices
    differ = class_rank(at_once, targets) != class_rank(direct, targets)
    assert differ.float().mean() < 1e-3


def test_centred_embedding_is_the_linear_part_of_the_projection_for_the_lens_and_the_memories():
    model = tiny_vit()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 2.0)  # a gain that is not all ones
        projection = ClassProjection(model)
        v = torch.randn(5, model.embed_dim, generator=torch.Generator().manual_seed(2))
        scale = torch.sqrt(v.var(dim=-1, unbiased=False) + model.norm.eps)[:, None]
        linear = v @ projection.centred_embedding.T / scale + projection.offset
        assert torch.allclose(linear, projection(v), atol=1e-5)
        # The memories' class directions are the same E_c, in float64 and L2-normalised.
        assert torch.allclose(class_directions(model), F.normalize(projection.centred_embedding.double(), dim=-1))
    rms = torch.nn.RMSNorm(4)
    weight = torch.randn(3, 4)
    assert torch.equal(centred_embedding(weight, rms), weight * rms.weight)  # no mean subtracted, none removed


def test_a_trace_s_centred_products_are_finished_into_logits_once():
    """``E_c v`` and the logits finished from it are two types; the trace gives its products up to the logits."""
    model = tiny_vit()
    projection = ClassProjection(model)
    with torch.no_grad():
        run = trace(model, images_for(model))
        expected = projection.streams(run.residual, run.attention, run.mlp)
        centred, scales = projection.centred(run.residual, run.attention, run.mlp)
        products = CentredStreams.split(centred, projection.spec.depth)
        from_graph = dataclasses.replace(run, attention=None, mlp=None, centred=products, scales=scales)
        logits = projection.of_trace(from_graph)
        assert isinstance(logits, StreamLogits)
        assert not isinstance(products, StreamLogits)
        assert torch.allclose(torch.cat(logits.parts(), dim=1), expected, atol=1e-5)
        assert from_graph.centred is None, "the products are the logits' memory now"
        with pytest.raises(ValueError, match="already finished"):
            projection.of_trace(from_graph)
    assert not hasattr(products, "ranks")


def test_class_rank_split_over_threads_equals_the_plain_count():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 700, 50, generator=generator).round(decimals=1)  # ties included
    targets = torch.tensor([[0, 7, 49], [3, 4, 5]])
    expected = torch.stack(
        [(logits[b] > logits[b, ..., k : k + 1]).sum(-1) for b, row in enumerate(targets.tolist()) for k in row]
    ).reshape(2, 3, 3, 700)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            assert torch.equal(class_rank(logits, targets), expected)
    finally:
        torch.set_num_threads(threads)


def test_class_rank_counts_strictly_greater_logits():
    logits = torch.tensor([[[0.5, 2.0, 2.0, -1.0], [3.0, 1.0, 0.0, 1.0]]])  # [B=1, M=2, C=4]
    ranks = class_rank(logits, torch.tensor([[1, 3]]))
    assert ranks.tolist() == [[[0, 1], [3, 1]]]  # [B, K, M]; ties do not count
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, 50, generator=generator)
    targets = torch.randint(0, 50, (3, 4), generator=generator)
    expected = torch.stack(
        [(logits > logits.gather(-1, targets[:, k, None, None, None].expand(-1, 5, 11, 1))).sum(-1) for k in range(4)],
        dim=1,
    )
    assert torch.equal(class_rank(logits, targets), expected)
    assert torch.allclose(identifiability(torch.tensor([0, 5, 9]), 10), torch.tensor([1.0, 0.5, 0.1]))


@pytest.mark.parametrize(
    ("ranks", "emerged"),
    [([3, 0, 1, 0, 0], 3), ([0, 0, 0], 0), ([0, 0, 1], -1), ([2, 1, 0], 2), ([0, 1, 0, 0], 2)],
)
def test_emergence_layer(ranks, emerged):
    assert emergence_layer(np.array(ranks)).item() == emerged
    assert emergence_layer(np.array([ranks, ranks])).tolist() == [emerged, emerged]


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_wee_patch16_reg1_gap_256"])
def test_gradient_map_from_one_backward_equals_per_block_gradients(name):
    model = tiny_vit() if name == "vit_tiny_patch16_224" else random_vit(name, img_size=64, depth=3)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    images = images_for(model)
    projection = ClassProjection(model)
    spec = projection.spec
    targets = torch.tensor([[1, 2], [3, 4]])
    fast = gradient_relevance(images, targets, projection)
    assert fast.shape == (2, 2, spec.num_image_tokens)

    # The definition: for each block its own loss and backward, on the ordinary (undetached) graph.
    if spec.pooling == "token":
        rows = slice(0, 1)

        def pool(tokens):
            return tokens[:, 0]
    else:
        rows = slice(spec.num_prefix, None)

        def pool(tokens):
            return tokens[:, spec.num_prefix :].mean(1)

    for k in range(targets.shape[1]):
        expected = torch.zeros(2, spec.num_image_tokens)
        for block in range(spec.depth):
            probs = []
            with torch.enable_grad(), materialised_attention(model, probs, as_leaves=True):
                run = trace(model, images)
                logits = projection(pool(run.attention[:, block]), pool(run.residual[:, -1]))
                loss = F.cross_entropy(logits, targets[:, k], reduction="sum")
                grad = torch.autograd.grad(loss, probs[block])[0]
            expected -= grad[:, :, rows, spec.num_prefix :].sum(dim=(1, 2))
        assert torch.allclose(fast[:, k], expected, atol=1e-4, rtol=1e-4)


def test_hooks_and_fused_attention_are_restored_even_when_the_pass_fails():
    model = tiny_vit()
    fused = [block.attn.fused_attn for block in model.blocks]

    def fail(*args):
        raise ValueError("boom in block 1")

    failing = model.blocks[1].register_forward_hook(fail)
    with pytest.raises(ValueError, match="boom"):
        trace(model, images_for(model), attention_probs=True, for_attention_gradients=True)
    failing.remove()
    for module in model.modules():
        assert not module._forward_hooks
        assert not module._forward_pre_hooks
        assert "forward" not in module.__dict__, "a recording wrapper was left on the module"
    assert [block.attn.fused_attn for block in model.blocks] == fused


def test_recording_wrappers_nest_record_in_order_and_leave_the_module_as_it_was():
    layer = torch.nn.Linear(3, 3)
    own = layer.forward
    layer.forward = own  # an instance forward of its own, as another tool may have set
    inputs, outputs = [], []
    x = torch.randn(2, 3)
    with recorded(layer, inputs=inputs), recorded(layer, outputs=outputs):
        y = layer(x)
        assert "forward" in layer.__dict__
    assert inputs == [x]
    assert len(outputs) == 1
    assert torch.equal(outputs[0], y)
    assert layer.__dict__["forward"] is own
    del layer.forward
    with pytest.raises(RuntimeError), recorded(layer, outputs=outputs):
        layer(torch.randn(2, 4))  # the wrong width: the call fails inside the wrapper
    assert "forward" not in layer.__dict__
    assert len(outputs) == 1


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: timm.create_model("resnet18", pretrained=False), "not a timm VisionTransformer"),
        (lambda: tiny_vit(global_pool="map"), "global_pool 'map'"),
        (lambda: tiny_vit(num_classes=0), "head that is not one linear layer"),
    ],
)
def test_unsupported_architectures_are_refused_clearly(build, message):
    with pytest.raises(UnsupportedModelError, match=message):
        inspect_vit(build())


def count_forward_passes(model):
    calls = []
    handle = model.patch_embed.register_forward_hook(lambda *args: calls.append(1))
    return calls, handle


def test_explain_results_targets_and_one_forward_pass_for_many_targets():
    model = tiny_vit()
    labels = [f"class {i}" for i in range(7)]
    images = images_for(model, batch=3)
    calls, handle = count_forward_passes(model)
    try:
        results = explain(model, images, labels, ExplainRequest(top_k=5, layers=[0, 3]), REF)
        assert len(calls) == 1
        calls.clear()
        explain(model, images, labels, ExplainRequest(targets=["CLASS 2", 4], gradient_map=True), REF)
        assert len(calls) == 2  # the traced pass, and the gradient map's own pass
    finally:
        handle.remove()

    result = results[0]
    assert Explanation.model_validate(json.loads(result.model_dump_json())) == result
    assert [t.index for t in result.targets] == [p.index for p in result.prediction[:5]]
    target = result.targets[0]
    assert target.rank == 0
    assert set(target.projection_maps) == {"0", "3"}
    assert len(target.projection_maps["3"]) == 4
    assert len(target.projection_maps["3"][0]) == 4
    assert len(target.pooled_ranks) == len(target.residual.image_identifiability) == 4
    assert len(target.attention.image_identifiability) == len(target.mlp.prefix_ranks["cls"]) == 3
    assert target.pooled_ranks == target.residual.prefix_ranks["cls"]  # CLS model: pooled = CLS token
    assert all(0.0 <= v <= 1.0 for row in target.projection_maps["3"] for v in row)


def test_probability_and_logit_maps_agree_with_identifiability_order():
    model = tiny_vit()
    labels = [str(i) for i in range(7)]
    images = images_for(model, batch=1)
    maps = {
        kind: explain(model, images, labels, ExplainRequest(targets=[2], map_kind=kind), REF)[0].targets[0]
        for kind in ("identifiability", "logit", "probability")
    }
    probability = torch.tensor(maps["probability"].projection_maps["3"])
    assert ((probability > 0) & (probability < 1)).all()
    # The token with the highest logit for the class is never less identifiable than the one with the lowest.
    logit = torch.tensor(maps["logit"].projection_maps["3"]).flatten()
    ident = torch.tensor(maps["identifiability"].projection_maps["3"]).flatten()
    assert ident[logit.argmax()] >= ident[logit.argmin()] or torch.isclose(logit.max(), logit.min())


@pytest.mark.parametrize(
    ("request_arguments", "message"),
    [
        ({"targets": ["class 9"]}, "unknown class 'class 9'; did you mean"),
        ({"targets": [7]}, "class index 7 is out of range: the model has classes 0..6"),
        ({"targets": [1, "class 1"]}, "targets repeat a class"),
        ({"layers": [4]}, "layer 4 is out of range: layers are 0 (embedding) to 3"),
        ({"layers": [-1]}, "layer -1 is out of range"),
        ({"targets": [*range(7), "class 1"]}, "8 targets for a model of 7 classes: name each class at most once"),
        ({"targets": [" class 2", "CLASS 2 "]}, "targets repeat a class"),
    ],
)
def test_bad_requests_are_clear_errors(request_arguments, message):
    model = tiny_vit()
    labels = [f"class {i}" for i in range(7)]
    with pytest.raises(ExplainError) as error:
        explain(model, images_for(model), labels, ExplainRequest(**request_arguments), REF)
    assert message in str(error.value)


def test_wrong_channel_count_or_size_is_a_clear_error():
    model = tiny_vit()
    labels = [str(i) for i in range(7)]
    with pytest.raises(ExplainError, match=r"images must be \[batch, 3, 32, 32\], got \[2, 1, 32, 32\]"):
        explain(model, torch.randn(2, 1, 32, 32), labels, ExplainRequest(), REF)


def test_resolve_targets_is_case_insensitive_and_rejects_booleans():
    assert resolve_targets(["bag", 1], ["Bag", "Coat"]) == [0, 1]
    with pytest.raises(ExplainError):
        resolve_targets([True], ["Bag", "Coat"])


def test_resolve_targets_strips_whitespace_as_the_api_does():
    assert resolve_targets([" bag ", "\tcoat"], ["Bag", "Coat"]) == [0, 1]


def test_two_threads_tracing_one_model_each_get_their_own_streams():
    """A worker of the threads pool explains one loaded model in two threads: neither records the other's pass."""
    import concurrent.futures

    model = tiny_vit()
    lens = ClassProjection(model).lens
    images = [images_for(model, batch) for batch in (1, 2)]  # two shapes: a stream recorded across would show
    with torch.no_grad():
        expected = [lens.trace(batch).residual for batch in images]

        def run(index):
            return [lens.trace(images[index]).residual for _ in range(5)]

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            results = list(pool.map(run, [0, 1]))
    for index, traces in enumerate(results):
        assert all(torch.equal(residual, expected[index]) for residual in traces)
    assert all("forward" not in module.__dict__ for module in model.modules())
