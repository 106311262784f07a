"""Per-layer features for CKA and probes: the hooks see what trace() and forward_intermediates return."""

import pytest
import timm
import torch

from worker.analyses.representations import RepresentationError, check_representation, describe, reduce, run_layers
from worker.lens.vit import trace


def tiny_vit(**overrides):
    torch.manual_seed(0)
    args = {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 32, "num_heads": 2, "num_classes": 5}
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**args, **overrides}).eval()


def tiny_resnet():
    torch.manual_seed(0)
    return timm.create_model(
        "resnet18", pretrained=False, layers=[1, 1, 1, 1], channels=[8, 16, 32, 64], in_chans=1, num_classes=4
    ).eval()


def collect(model, images):
    seen = {}
    logits = run_layers(model, images, lambda name, raw: seen.setdefault(name, raw.clone()))
    return seen, logits


def test_vit_layers_are_the_residual_stream_of_trace():
    model, images = tiny_vit(), torch.randn(3, 3, 32, 32)
    spec = describe(model)
    assert spec.names == ("block 1", "block 2", "block 3")
    assert spec.num_prefix == 1
    assert spec.grid == (4, 4)
    seen, logits = collect(model, images)
    with torch.no_grad():
        run = trace(model, images, sublayers=False)
    assert torch.allclose(logits, run.logits, atol=1e-6)
    for b, name in enumerate(spec.names, start=1):
        x = run.residual[:, b]  # [B, T, D]
        assert torch.allclose(seen[name], x, atol=1e-6)
        assert torch.allclose(reduce(seen[name], "tokens", spec), x.flatten(1), atol=1e-6)
        assert torch.allclose(reduce(seen[name], "cls", spec), x[:, 0], atol=1e-6)
        assert torch.allclose(reduce(seen[name], "gap", spec), x[:, 1:].mean(dim=1), atol=1e-6)
    assert not any(block._forward_hooks for block in model.blocks)  # hooks removed


def test_cnn_layers_are_forward_intermediates():
    model, images = tiny_resnet(), torch.randn(2, 1, 28, 28)
    spec = describe(model)
    assert spec.kind == "cnn"
    assert spec.names == ("act1", "layer1", "layer2", "layer3", "layer4")
    seen, logits = collect(model, images)
    with torch.no_grad():
        _, expected = model.forward_intermediates(images)
        assert torch.allclose(logits, model(images), atol=1e-6)
    for name, features in zip(spec.names, expected, strict=True):
        assert torch.equal(seen[name], features)
        assert reduce(seen[name], "tokens", spec).shape == (2, features[0].numel())
        assert torch.allclose(reduce(seen[name], "gap", spec), features.mean(dim=(2, 3)))


def test_cls_is_refused_where_there_is_none():
    with pytest.raises(RepresentationError, match="CNN has no CLS"):
        check_representation(describe(tiny_resnet()), "cls")
    gap_vit = tiny_vit(class_token=False, global_pool="avg")
    with pytest.raises(RepresentationError, match="no CLS"):
        check_representation(describe(gap_vit), "cls")
    check_representation(describe(gap_vit), "gap")
    with pytest.raises(RepresentationError, match="unknown representation"):
        check_representation(describe(gap_vit), "pixels")
