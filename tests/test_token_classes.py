"""``token_classes``: every image token's top-k classes at every layer and stream, for the viewer.

An option of a request: absent (0), the request's parameters, its content key and its result
read exactly as before the option existed.
"""

from __future__ import annotations

import json

import pytest
import torch

from classlens.core.contract import ExplainRequest, ModelRef
from classlens.core.jobs import content_key
from classlens.core.requests import RequestError, canonical_request
from tests.service_fixtures import DEFAULT_EXPLAIN_PARAMETERS as DEFAULT_PARAMETERS
from worker import random_models
from worker.lens.explain import explain

REF = ModelRef(name="random", version="0", weights_sha256="0" * 64)
LABELS = [f"class {i}" for i in range(12)]


def tiny_vit():
    arguments = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=12)
    return random_models.random_vit("vit_tiny_patch16_224", **arguments)


def streams_by_hand(model, x):
    """x_0..x_L, a_1..a_L, m_1..m_L of a timm ViT, block by block, each ``[B, T, D]``."""
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    residual, attention, mlp = [tokens], [], []
    for block in model.blocks:
        a = block.ls1(block.attn(block.norm1(tokens)))
        m = block.ls2(block.mlp(block.norm2(tokens + a)))
        tokens = tokens + a + m
        residual.append(tokens)
        attention.append(a)
        mlp.append(m)
    return {"residual": residual, "attention": attention, "mlp": mlp}


def test_a_request_without_token_classes_keeps_its_parameters_and_key():
    assert canonical_request({}, LABELS, 2).model_dump(mode="json") == DEFAULT_PARAMETERS
    zero = canonical_request({"token_classes": 0}, LABELS, 2).model_dump(mode="json")
    assert content_key("f", "i", zero) == content_key("f", "i", DEFAULT_PARAMETERS)
    asked = canonical_request({"token_classes": 5}, LABELS, 2).model_dump(mode="json")
    assert asked == {**DEFAULT_PARAMETERS, "token_classes": 5}
    assert content_key("f", "i", asked) != content_key("f", "i", DEFAULT_PARAMETERS)
    with pytest.raises(RequestError, match="token_classes"):
        canonical_request({"token_classes": 11}, LABELS, 2)


def test_the_listed_classes_are_each_tokens_best_classes_at_each_layer_and_stream():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    results = explain(model, x, LABELS, ExplainRequest(token_classes=4), REF)
    with torch.no_grad():
        streams = streams_by_hand(model, x)
        for b, result in enumerate(results):
            assert result.token_classes is not None
            assert set(result.token_classes) == {"residual", "attention", "mlp"}
            for name, layers in streams.items():
                listed = result.token_classes[name]  # type: ignore[index]
                assert len(listed) == len(layers)  # residual: L + 1, sublayers: L
                for layer, vectors in enumerate(layers):
                    logits = model.head(model.norm(vectors[b, 1:]))  # fresh final norm, head bias: the defaults
                    for token, classes in enumerate(listed[layer]):
                        assert len(classes) == 4
                        order = logits[token].argsort(descending=True)[:4].tolist()
                        assert classes == order, (name, layer, token)


def test_without_sublayers_only_the_residual_stream_is_listed_and_by_default_nothing():
    model = tiny_vit()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    [result] = explain(model, x, LABELS, ExplainRequest(token_classes=2, sublayers=False), REF)
    assert result.token_classes is not None
    assert list(result.token_classes) == ["residual"]
    assert [len(tokens) for tokens in result.token_classes["residual"]] == [16, 16, 16]
    [plain] = explain(model, x, LABELS, ExplainRequest(), REF)
    assert plain.token_classes is None
    assert "token_classes" not in json.loads(plain.model_dump_json())
