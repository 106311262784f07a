"""Attention and context perturbations: the masks reach every block, hooks go away, region tokens are dropped."""

import numpy as np
import pytest
import torch

from tests.test_representations import tiny_vit
from worker.analyses.perturbation import (
    attention_mask,
    default_region,
    masked_attention,
    perturbation_effects,
    region_keep,
)
from worker.audits import central_mask
from worker.lens.regions import central_box
from worker.lens.tokens import dropped_tokens, forward_without_tokens, keep_tokens
from worker.lens.vit import trace


def test_masks():
    self_only = attention_mask("self-only", 1, 4)
    assert self_only[0].all()  # the CLS query attends as usual
    assert torch.equal(self_only[1:, 1:], torch.eye(4, dtype=torch.bool))
    assert not self_only[1:, 0].any()
    no_cls = attention_mask("no-cls", 2, 4)
    assert not no_cls[2:, :2].any()
    assert no_cls[2:, 2:].all()
    assert no_cls[:2].all()
    with pytest.raises(ValueError, match="prefix"):
        attention_mask("no-cls", 0, 4)


@pytest.mark.parametrize("kind", ["self-only", "no-cls"])
def test_masked_attention_reaches_every_block_fused_or_not(kind):
    model, images = tiny_vit(), torch.randn(2, 3, 32, 32)
    mask = attention_mask(kind, 1, 16)
    with torch.no_grad():
        plain = model(images)
        unmasked = trace(model, images, sublayers=False)
        with masked_attention(model, mask):
            fused = model(images)  # scaled_dot_product_attention with a boolean mask
            run = trace(model, images, sublayers=False, attention_probs=True)  # the unfused path
        after = model(images)
    assert torch.allclose(fused, run.logits, atol=1e-5)
    assert not torch.allclose(run.residual[:, -1, 1:], unmasked.residual[:, -1, 1:], atol=1e-3)
    assert torch.equal(after, plain)
    assert not any(block.attn._forward_pre_hooks for block in model.blocks)
    for probabilities in run.attention_probs:  # [B, H, T, T]
        assert torch.all(probabilities[:, :, 1:][..., ~mask[1:]] == 0)


def test_region_tokens():
    keep = region_keep((4, 4), (1, 1, 3, 3))
    assert keep.tolist() == [0, 1, 2, 3, 4, 7, 8, 11, 12, 13, 14, 15]
    assert default_region((7, 7)) == (2, 2, 5, 5)
    assert default_region((4, 4)) == (1, 1, 3, 3)
    with pytest.raises(ValueError, match="not a box"):
        region_keep((4, 4), (0, 0, 5, 2))
    with pytest.raises(ValueError, match="not a box"):
        region_keep((4, 4), (2, 0, 2, 2))
    with pytest.raises(ValueError, match="whole"):
        region_keep((4, 4), (0, 0, 4, 4))


@pytest.mark.parametrize("grid", [(7, 7), (14, 14), (4, 4), (3, 5), (6, 9), (7, 2)])
def test_perturb_drops_the_cells_of_the_audits_central_share(grid):
    """The default region is the audits' central region: ``central_share`` and ``perturb`` mean the same cells."""
    mask = central_mask(*grid)
    if not mask.any():
        with pytest.raises(ValueError, match="no central region"):
            default_region(grid)
        return
    dropped = set(range(grid[0] * grid[1])) - set(region_keep(grid, default_region(grid)).tolist())
    assert dropped == set(np.flatnonzero(mask).tolist())


def test_the_central_region_is_strictly_inside_the_half_box():
    assert central_box((7, 7)) == (2, 2, 5, 5)
    assert central_mask(7, 7).sum() == 9
    assert central_box((14, 14)) == (4, 4, 10, 10)
    assert central_mask(14, 14).sum() == 36
    assert central_box((2, 6)) == (1, 2, 1, 4)  # no cell centre of a 2-cell axis is strictly inside


def test_dropped_tokens_match_the_lens_token_removal():
    model, images = tiny_vit(), torch.randn(3, 3, 32, 32)
    keep = region_keep((4, 4), (0, 0, 2, 4))
    with torch.no_grad():
        with dropped_tokens(model, keep):
            run = trace(model, images, sublayers=False)
        expected = forward_without_tokens(model, images, keep.expand(3, -1))
    assert run.residual.shape[2] == 1 + len(keep)
    assert torch.allclose(run.logits, expected, atol=1e-5)
    assert not model.patch_drop._forward_hooks


def test_keep_tokens_keeps_the_prefix_and_the_listed_image_tokens_in_order():
    sequence = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # 1 prefix + 4 image tokens
    shared = keep_tokens(sequence, torch.tensor([3, 1]), num_prefix=1)
    assert torch.equal(shared, sequence[:, [0, 4, 2]])
    own = keep_tokens(sequence, torch.tensor([[3, 1], [0, 2]]), num_prefix=1)
    assert torch.equal(own[0], sequence[0, [0, 4, 2]])
    assert torch.equal(own[1], sequence[1, [0, 1, 3]])


def test_effects_per_layer():
    model = tiny_vit()
    batches = [(torch.randn(4, 3, 32, 32), None), (torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))]
    effects = perturbation_effects(model, batches, region=(1, 1, 3, 3))
    curves = effects["curves"]
    assert set(curves) == {"original", "self-only", "no-cls", "context", "context_original"}
    assert all(values.shape == (4,) for values in curves.values())
    # x_0 comes before any attention: the attention perturbations cannot change layer 0.
    assert curves["self-only"][0] == pytest.approx(curves["original"][0])
    assert curves["no-cls"][0] == pytest.approx(curves["original"][0])
    assert curves["context"][0] == pytest.approx(curves["context_original"][0])
    assert effects["kept_tokens"] == 12
    assert effects["region"] == (1, 1, 3, 3)
    assert set(effects["hits"]) == {"original", "self-only", "no-cls", "context"}
    assert effects["hits"]["original"] >= 0.5  # the unlabelled batch is scored against its own predictions
    assert min(effects["hits"].values()) >= 0.0
    assert max(effects["hits"].values()) <= 1.0


def test_a_gap_vit_without_prefix_tokens_has_no_no_cls_pass():
    model = tiny_vit(class_token=False, global_pool="avg")
    effects = perturbation_effects(model, [(torch.randn(4, 3, 32, 32), None)])
    assert set(effects["curves"]) == {"original", "self-only", "context", "context_original"}
    assert effects["region"] == (1, 1, 3, 3)  # the default: the central box
