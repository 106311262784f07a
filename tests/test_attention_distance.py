"""Mean attention distance: zero for self-only attention, the closed form for uniform attention."""

import math

import pytest
import timm
import torch

from worker.analyses.attention_distance import distance_from_attention, mean_attention_distance, patch_distances


def uniform_mean_distance(h: int, w: int, patch: int) -> float:
    """The mean pixel distance between two patch centres drawn uniformly on an h x w grid, by brute force."""
    cells = [(r, c) for r in range(h) for c in range(w)]
    total = sum(math.dist((patch * a, patch * b), (patch * c, patch * d)) for a, b in cells for c, d in cells)
    return total / len(cells) ** 2


def test_self_only_attention_has_zero_distance():
    n, prefix = 16, 1
    probabilities = torch.zeros(2, 3, n + prefix, n + prefix)
    probabilities[:, :, torch.arange(n + prefix), torch.arange(n + prefix)] = 1.0
    sums = distance_from_attention(probabilities, patch_distances((4, 4), (8, 8)), prefix)
    assert torch.equal(sums, torch.zeros(3, dtype=torch.float64))


def test_patch_distances_are_pixels_between_centres():
    distances = patch_distances((2, 3), (16, 16))
    assert distances[0, 5] == pytest.approx(math.dist((0, 0), (16, 32)))
    assert torch.allclose(distances, distances.T)


@pytest.mark.parametrize("prefix", ["drop", "renormalise"])
def test_uniform_attention_matches_the_closed_form(prefix):
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=48, patch_size=8, depth=2, embed_dim=32, num_heads=2
    ).eval()
    for block in model.blocks:  # q = k = 0: every query attends uniformly to all T tokens
        torch.nn.init.zeros_(block.attn.qkv.weight)
        torch.nn.init.zeros_(block.attn.qkv.bias)
    images = [torch.randn(3, 3, 48, 48), torch.randn(2, 3, 48, 48)]
    distances = mean_attention_distance(model, images, prefix=prefix)
    expected = uniform_mean_distance(6, 6, 8)
    if prefix == "drop":  # the CLS column's 1/T of the weight is dropped, not renormalised
        expected *= 36 / 37
    assert distances.shape == (2, 2)
    assert torch.allclose(distances, torch.full((2, 2), expected, dtype=torch.float64), atol=1e-6)
    # The model's outputs are untouched and the fused-attention flag restored.
    assert all(block.attn.fused_attn == model.blocks[0].attn.fused_attn for block in model.blocks)


def test_no_images_is_an_error():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1)
    with pytest.raises(ValueError, match="no images"):
        mean_attention_distance(model, [])
