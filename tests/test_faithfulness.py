"""Token removal, relevance baselines and the faithfulness protocol (docs/methods.md), on tiny random ViTs."""

from __future__ import annotations

from typing import Any, cast

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from worker.lens.baselines import attention_rollout, chefer_relevance, grad_cam, random_relevance
from worker.lens.faithfulness import (
    PAPER,
    auc,
    evaluate_methods,
    evaluate_protocols,
    paper_auc,
    removal_curve,
    tokens_to_keep,
)
from worker.lens.tokens import forward_without_tokens
from worker.lens.vit import trace

NUM_TOKENS = 16  # 32 x 32 pixels in 8 x 8 patches


def tiny_vit(seed: int = 0, depth: int = 2, **kwargs: Any) -> VisionTransformer:
    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=depth, num_classes=5, **kwargs
    )
    return cast(VisionTransformer, model.eval())


def gap_vit(seed: int = 0) -> VisionTransformer:
    return tiny_vit(seed, global_pool="avg", class_token=False)


def images(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("make", [tiny_vit, gap_vit], ids=["cls", "gap"])
def test_keeping_every_token_reproduces_the_model(make) -> None:
    model, x = make(), images()
    keep = torch.arange(NUM_TOKENS).expand(len(x), -1)
    with torch.no_grad():
        assert torch.allclose(forward_without_tokens(model, x, keep), model(x), atol=1e-5)


@pytest.mark.parametrize("make", [tiny_vit, gap_vit], ids=["cls", "gap"])
def test_dropping_tokens_changes_the_logits(make) -> None:
    model, x = make(), images()
    keep = torch.arange(0, NUM_TOKENS, 2).expand(len(x), -1)
    with torch.no_grad():
        full, partial = model(x), forward_without_tokens(model, x, keep)
    assert partial.shape == full.shape
    assert not torch.allclose(partial, full, atol=1e-3)


def test_keep_order_does_not_matter_but_the_images_own_indices_do() -> None:
    """Tokens carry their position embedding, so permuting kept tokens changes nothing; per-image keeps differ."""
    model, x = tiny_vit(), images(2)
    keep = torch.tensor([[0, 5, 9], [1, 2, 3]])
    with torch.no_grad():
        logits = forward_without_tokens(model, x, keep)
        permuted = forward_without_tokens(model, x, keep.flip(-1))
        first = forward_without_tokens(model, x[:1], keep[:1])
    assert torch.allclose(logits, permuted, atol=1e-5)
    assert torch.allclose(logits[:1], first, atol=1e-5)


def test_bad_keep_indices_are_refused() -> None:
    model, x = tiny_vit(), images(2)
    with pytest.raises(ValueError, match="outside"):
        forward_without_tokens(model, x, torch.tensor([[0, NUM_TOKENS], [0, 1]]))
    with pytest.raises(ValueError, match="GAP"):
        forward_without_tokens(gap_vit(), x, torch.zeros(2, 0, dtype=torch.int64))


def test_tokens_to_keep_drops_the_top_or_the_bottom() -> None:
    relevance = torch.stack([torch.arange(16).float(), torch.arange(16).flip(0).float()])
    # Image 0: token j has relevance j; image 1: token j has relevance 15 - j.
    top = tokens_to_keep(relevance, 0.25, positive=True)  # drops round(4.0) = 4 most relevant
    bottom = tokens_to_keep(relevance, 0.25, positive=False)
    assert sorted(top[0].tolist()) == list(range(12))
    assert sorted(top[1].tolist()) == list(range(4, 16))
    assert sorted(bottom[0].tolist()) == list(range(4, 16))
    assert sorted(bottom[1].tolist()) == list(range(12))
    assert tokens_to_keep(relevance, 0.0, positive=True).shape == (2, 16)
    assert tokens_to_keep(relevance, 0.1, positive=True).shape == (2, 14)  # round(1.6) = 2 dropped


def test_removal_curve_starts_at_the_full_model_and_follows_the_order() -> None:
    model, x = tiny_vit(), images(4)
    with torch.no_grad():
        logits = model(x)
    labels = logits.argmax(-1)
    relevance = torch.rand(4, NUM_TOKENS, generator=torch.Generator().manual_seed(3))
    curve = removal_curve(model, x, labels, relevance, positive=True)
    assert curve["fractions"][0] == 0.0
    assert len(curve["accuracy"]) == 10
    assert curve["accuracy"][0] == 1.0
    assert curve["probability"][0] == pytest.approx(logits.softmax(-1).max(-1).values.mean().item(), abs=1e-6)
    assert curve["dropped"] == [round(k / 10 * NUM_TOKENS) for k in range(10)]

    # The value at 50% must be what the model gives on the less relevant half.
    keep = relevance.argsort(-1)[:, :8]
    with torch.no_grad():
        half = forward_without_tokens(model, x, keep).softmax(-1).gather(1, labels[:, None]).mean().item()
    assert curve["probability"][5] == pytest.approx(half, abs=1e-6)
    negative = removal_curve(model, x, labels, relevance, positive=False)
    assert negative["probability"][0] == pytest.approx(curve["probability"][0], abs=1e-6)
    assert negative["probability"][5] != pytest.approx(curve["probability"][5], abs=1e-6)


def test_auc_is_the_mean_height() -> None:
    fractions = [k / 10 for k in range(10)]
    assert auc(fractions, [0.7] * 10) == pytest.approx(0.7)
    ramp = [1.0 - f for f in fractions]  # 1.0 down to 0.1, mean 0.55
    assert auc(fractions, ramp) == pytest.approx(0.55)
    assert auc([0.0, 0.5, 1.0], [0.0, 1.0, 0.0]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least two points"):
        auc([0.0], [1.0])


def test_random_relevance_is_reproducible() -> None:
    x, targets = images(2), torch.zeros(2, 3, dtype=torch.int64)
    first = random_relevance(x, targets, NUM_TOKENS, torch.Generator().manual_seed(7))
    again = random_relevance(x, targets, NUM_TOKENS, torch.Generator().manual_seed(7))
    other = random_relevance(x, targets, NUM_TOKENS, torch.Generator().manual_seed(8))
    assert first.shape == (2, 3, NUM_TOKENS)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("make", [tiny_vit, gap_vit], ids=["cls", "gap"])
def test_attention_rollout_is_a_class_agnostic_flow(make) -> None:
    model, x = make(), images()
    targets = torch.tensor([[0, 1], [2, 3], [4, 0]])
    rollout = attention_rollout(model, x, targets)
    assert rollout.shape == (3, 2, NUM_TOKENS)
    assert (rollout >= 0).all()
    assert torch.equal(rollout[:, 0], rollout[:, 1])
    # Rows of the rollout are distributions over all tokens, so the image-token part sums to at most 1.
    assert (rollout[:, 0].sum(-1) <= 1 + 1e-5).all()


def test_attention_rollout_of_one_block_is_half_attention_plus_identity() -> None:
    model, x = tiny_vit(depth=1), images()
    with torch.no_grad():
        probs = trace(model, x, sublayers=False, attention_probs=True).attention_probs
    assert probs is not None
    expected = probs[0].mean(1)[:, 0, 1:] / 2  # (A + I) / 2 at the CLS row: the identity is off the image columns
    rollout = attention_rollout(model, x, torch.zeros(3, 1, dtype=torch.int64))
    assert torch.allclose(rollout[:, 0], expected, atol=1e-6)


@pytest.mark.parametrize("make", [tiny_vit, gap_vit], ids=["cls", "gap"])
def test_grad_cam_without_parameter_gradients_leaves_no_hooks(make) -> None:
    model, x = make(), images()
    model.requires_grad_(False)
    targets = torch.tensor([[0, 1], [2, 3], [4, 0]])
    cam = grad_cam(model, x, targets)
    assert cam.shape == (3, 2, NUM_TOKENS)
    assert (cam >= 0).all()
    assert cam.abs().sum() > 0
    assert not torch.equal(cam[:, 0], cam[:, 1])
    assert not cam.requires_grad
    assert len(model.blocks[-1].norm1._forward_hooks) == 0
    assert all(p.grad is None for p in model.parameters())


def test_grad_cam_matches_a_direct_computation() -> None:
    model, x = tiny_vit(), images(2)
    targets = torch.tensor([[3], [1]])
    saved: list[torch.Tensor] = []

    def keep_output(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> None:
        output.retain_grad()
        saved.append(output)

    norm1 = cast(torch.nn.Module, model.blocks[-1].norm1)
    handle = norm1.register_forward_hook(keep_output)
    try:
        model(x).gather(1, targets).sum().backward()
    finally:
        handle.remove()
    grads = saved[0].grad
    assert grads is not None
    activations, grads = saved[0][:, 1:], grads[:, 1:]
    expected = torch.relu((activations * grads.mean(1, keepdim=True)).sum(-1))
    model.zero_grad(set_to_none=True)
    assert torch.allclose(grad_cam(model, x, targets)[:, 0], expected.detach(), atol=1e-5)


def test_evaluate_methods_does_not_depend_on_batch_size() -> None:
    model, x = tiny_vit(), images(5)
    with torch.no_grad():
        labels = model(x).argmax(-1)
    methods = {
        "rollout": lambda batch, targets: attention_rollout(model, batch, targets),
        "grad_cam": lambda batch, targets: grad_cam(model, batch, targets),
    }
    whole = evaluate_methods(model, x, labels, methods, batch_size=5)
    split = evaluate_methods(model, x, labels, methods, batch_size=2)
    assert set(whole) == {"rollout", "grad_cam"}
    for name in methods:
        for direction in ("positive", "negative"):
            a, b = whole[name][direction], split[name][direction]
            assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-9)
            assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)
            assert a["auc"]["probability"] == pytest.approx(auc(a["fractions"], a["probability"]))
            assert a["accuracy"][0] == 1.0


def chefer_by_hand(model: VisionTransformer, x: torch.Tensor, target: int, cls: bool) -> torch.Tensor:
    """Chefer et al.'s relevance of one image for one class, written out: retain_grad, .backward, a loop per block."""
    recorded: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> None:
        output.retain_grad()
        recorded.append(output)

    attentions = [cast(Any, block).attn for block in model.blocks]
    handles = [attention.attn_drop.register_forward_hook(keep) for attention in attentions]
    fused = [attention.fused_attn for attention in attentions]
    for attention in attentions:
        attention.fused_attn = False
    try:
        model(x.clone().requires_grad_(True))[0, target].backward()
    finally:
        for handle in handles:
            handle.remove()
        for attention, was in zip(attentions, fused, strict=True):
            attention.fused_attn = was
    tokens = recorded[0].shape[-1]
    relevance = torch.eye(tokens)
    for attention in recorded:
        grad = attention.grad
        assert grad is not None
        cam = torch.zeros(tokens, tokens)
        for head in range(attention.shape[1]):
            cam += (grad[0, head] * attention[0, head]).clamp(min=0)
        cam = cam / attention.shape[1]
        relevance = relevance + cam @ relevance
    model.zero_grad(set_to_none=True)
    if cls:
        return relevance[0, 1:].detach()  # the CLS row at the image tokens
    return relevance.mean(dim=0).detach()  # no prefix: the mean of every (image-token) row


@pytest.mark.parametrize("make", [tiny_vit, gap_vit], ids=["cls", "gap"])
def test_chefer_relevance_matches_a_line_by_line_computation(make) -> None:
    model, x = make(), images(2)
    targets = torch.tensor([[3, 0], [1, 4]])
    relevance = chefer_relevance(model, x, targets)
    assert relevance.shape == (2, 2, NUM_TOKENS)
    assert not relevance.requires_grad
    for b in range(2):
        for k in range(2):
            expected = chefer_by_hand(model, x[b : b + 1], int(targets[b, k]), cls=make is tiny_vit)
            assert torch.allclose(relevance[b, k], expected, atol=1e-6, rtol=1e-5), (b, k)
    assert not torch.allclose(relevance[:, 0], relevance[:, 1])  # class-specific, unlike rollout


def test_chefer_relevance_leaves_the_model_as_it_was() -> None:
    model, x = tiny_vit(), images(2)
    model.requires_grad_(False)
    relevance = chefer_relevance(model, x, torch.tensor([[0], [2]]))
    assert (relevance >= 0).all()
    assert relevance.abs().sum() > 0
    assert all(len(cast(Any, block).attn.attn_drop._forward_hooks) == 0 for block in model.blocks)
    assert all(p.grad is None for p in model.parameters())


def test_paper_auc_is_the_mean_height_relative_to_the_peak() -> None:
    assert paper_auc([0.8] * 49) == pytest.approx(1.0)
    assert paper_auc([0.2, 0.4, 0.6, 0.8]) == pytest.approx((0.2 + 0.4 + 0.6 + 0.8) / (0.8 * 4))
    assert paper_auc([0.0, 0.0]) == 0.0


@pytest.mark.parametrize("make", [tiny_vit, gap_vit], ids=["cls", "gap"])
def test_the_paper_protocol_keeps_the_n_most_or_least_relevant_tokens(make) -> None:
    model, x = make(), images(3)
    with torch.no_grad():
        labels = model(x).argmax(-1)
    relevance = torch.rand(3, 1, NUM_TOKENS, generator=torch.Generator().manual_seed(5))
    results = evaluate_protocols(
        model, x, labels, {"fixed": lambda batch, targets: relevance[: len(batch)]}, batch_size=3
    )
    assert set(results) == {"project", "paper"}
    for direction, most in (("negative", True), ("positive", False)):
        curve = results["paper"]["fixed"][direction]
        assert curve["kept"] == list(range(1, NUM_TOKENS + 1))
        accuracy, probability = [], []
        for n in range(1, NUM_TOKENS + 1):
            keep = []
            for b in range(3):
                ranked = sorted(range(NUM_TOKENS), key=lambda j: float(relevance[b, 0, j]), reverse=most)
                keep.append(ranked[:n])
            with torch.no_grad():
                logits = forward_without_tokens(model, x, torch.tensor(keep))
            accuracy.append(int((logits.argmax(-1) == labels).sum()) / 3)
            probability.append(float(logits.softmax(-1)[torch.arange(3), labels].mean()))
        assert curve["accuracy"] == pytest.approx(accuracy, abs=1e-9)
        assert curve["probability"] == pytest.approx(probability, abs=1e-5)
        assert curve["accuracy"][-1] == 1.0  # every token kept: the model's own prediction
        assert curve["auc"]["accuracy"] == pytest.approx(sum(accuracy) / (max(accuracy) * NUM_TOKENS))
        assert curve["auc"]["probability"] == pytest.approx(sum(probability) / (max(probability) * NUM_TOKENS))
    # The project's protocol, from the same maps, is what evaluate_methods gives.
    alone = evaluate_methods(model, x, labels, {"fixed": lambda batch, targets: relevance[: len(batch)]}, 3)
    assert alone["fixed"]["positive"]["auc"] == pytest.approx(results["project"]["fixed"]["positive"]["auc"])


def test_both_protocols_do_not_depend_on_batch_size() -> None:
    model, x = tiny_vit(), images(4)
    with torch.no_grad():
        labels = model(x).argmax(-1)
    methods = {"chefer": lambda batch, targets: chefer_relevance(model, batch, targets)}
    whole = evaluate_protocols(model, x, labels, methods, batch_size=4, protocols=(PAPER,))
    split = evaluate_protocols(model, x, labels, methods, batch_size=3, protocols=(PAPER,))
    for protocol in ("paper",):
        for direction in ("positive", "negative"):
            a, b = whole[protocol]["chefer"][direction], split[protocol]["chefer"][direction]
            assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-9)
            assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)
