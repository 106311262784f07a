"""Baseline maps (Chefer et al., attention rollout, Grad-CAM) in an explanation, on tiny random ViTs.

They are options of a request: absent, the request's parameters, its content key and its
result read exactly as before the option existed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch

from classlens.core.contract import ExplainRequest, ModelRef
from classlens.core.jobs import content_key
from classlens.core.requests import RequestError, canonical_request
from tests.service_fixtures import DEFAULT_EXPLAIN_PARAMETERS as DEFAULT_PARAMETERS
from worker import random_models
from worker.lens.baselines import attention_rollout, chefer_relevance, grad_cam
from worker.lens.explain import ExplainError, explain

REF = ModelRef(name="random", version="0", weights_sha256="0" * 64)
LABELS = [f"class {i}" for i in range(5)]


def tiny_vit(**overrides):
    arguments = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=5)
    return random_models.random_vit("vit_tiny_patch16_224", **{**arguments, **overrides})


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(4))


def test_a_request_without_baselines_keeps_its_parameters_and_key():
    request = canonical_request({}, LABELS, 2)
    assert request.model_dump(mode="json") == DEFAULT_PARAMETERS
    empty = canonical_request({"baseline_maps": []}, LABELS, 2)
    assert content_key("f", "i", empty.model_dump(mode="json")) == content_key("f", "i", DEFAULT_PARAMETERS)
    asked = canonical_request({"baseline_maps": ["rollout"]}, LABELS, 2).model_dump(mode="json")
    assert content_key("f", "i", asked) != content_key("f", "i", DEFAULT_PARAMETERS)
    assert ExplainRequest.model_validate(asked).baseline_maps == ["rollout"]


def test_baselines_are_canonical_whatever_their_order_and_repeats():
    one = canonical_request({"baseline_maps": ["gradcam", "chefer", "gradcam"]}, LABELS, 2)
    other = canonical_request({"baseline_maps": ["chefer", "gradcam"]}, LABELS, 2)
    assert one == other
    assert one.baseline_maps == ["chefer", "gradcam"]
    with pytest.raises(RequestError, match="baseline_maps"):
        canonical_request({"baseline_maps": ["lime"]}, LABELS, 2)


def test_only_rollout_needs_no_backward_pass():
    assert not ExplainRequest().needs_gradients
    assert not ExplainRequest(baseline_maps=["rollout"]).needs_gradients
    assert ExplainRequest(baseline_maps=["rollout", "chefer"]).needs_gradients
    assert ExplainRequest(baseline_maps=["gradcam"]).needs_gradients
    assert ExplainRequest(gradient_map=True).needs_gradients


@pytest.mark.parametrize("pooling", ["token", "avg"])
def test_explain_returns_each_requested_baseline_as_its_method_computes_it(pooling):
    model = tiny_vit(global_pool=pooling, class_token=pooling == "token")
    x = images()
    request = ExplainRequest(targets=[3, 1], baseline_maps=["chefer", "rollout", "gradcam"])
    results = explain(model, x, LABELS, request, REF)
    targets = torch.tensor([[3, 1], [3, 1]])
    expected = {
        "chefer": chefer_relevance(model, x, targets),
        "rollout": attention_rollout(model, x, targets),
        "gradcam": grad_cam(model, x, targets),
    }
    for b, result in enumerate(results):
        for k, target in enumerate(result.targets):
            assert target.baseline_maps is not None
            assert list(target.baseline_maps) == ["chefer", "rollout", "gradcam"]
            for name, values in expected.items():
                grid = np.asarray(target.baseline_maps[name])
                assert grid.shape == (4, 4)
                assert np.allclose(grid.ravel(), values[b, k].numpy(), atol=1e-4), (name, b, k)
        dumped = json.loads(result.model_dump_json())
        assert set(dumped["targets"][0]["baseline_maps"]) == {"chefer", "rollout", "gradcam"}


def test_without_baselines_the_result_has_no_baseline_field():
    model, x = tiny_vit(), images()
    [result, _] = explain(model, x, LABELS, ExplainRequest(), REF)
    assert all(target.baseline_maps is None for target in result.targets)
    assert all("baseline_maps" not in target for target in json.loads(result.model_dump_json())["targets"])


def test_grad_cam_is_refused_for_a_family_it_cannot_open_and_chefer_is_not():
    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, num_classes=5).eval()
    x = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ExplainError, match="gradcam map is not available"):
        explain(model, x, LABELS, ExplainRequest(baseline_maps=["gradcam"]), REF)
    [result] = explain(model, x, LABELS, ExplainRequest(top_k=1, baseline_maps=["chefer", "rollout"]), REF)
    maps = result.targets[0].baseline_maps
    assert maps is not None
    assert np.asarray(maps["chefer"]).shape == (2, 2)
    assert np.asarray(maps["chefer"]).sum() > 0
