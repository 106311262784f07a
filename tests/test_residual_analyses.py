import timm
import torch

from worker.analyses.residual import categorical_updates, residual_composition
from worker.lens.projection import ClassProjection
from worker.lens.vit import trace


def small_vit():
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3, num_classes=6
    ).eval()


def test_categorical_updates_match_a_direct_computation():
    model = small_vit()
    images = torch.randn(4, 3, 32, 32)
    targets = torch.tensor([0, 1, 2, 3])
    updates = categorical_updates(model, images, targets)
    projection = ClassProjection(model)
    with torch.no_grad():
        run = trace(model, images)
        last = run.residual[:, -1:, 1:]
        z = lambda v: projection(v[:, :, 1:], last)[torch.arange(4), :, :, targets]  # noqa: E731  [B, L, N]
        before, after = z(run.residual[:, :-1]), z(run.residual[:, 1:])
        middle = z(run.residual[:, :-1] + run.attention)
        rises = (after > before).double().mean(dim=(0, 2))
        mlp_update = (z(run.mlp) - middle).double().mean(dim=(0, 2))
    assert torch.allclose(updates["rises"], rises)
    assert torch.allclose(updates["mlp_update"], mlp_update, atol=1e-6)
    assert updates["attention_update"].shape == (3,)


def test_residual_composition_shares():
    model = small_vit()
    shares = residual_composition(model, torch.randn(3, 3, 32, 32))
    assert set(shares) == {"attention", "mlp", "previous", "composed"}
    for name, values in shares.items():
        assert values.shape == (3,), name
        assert ((values >= 0) & (values <= 1)).all(), name
    # A token is "composed" only when it matches none: composed + any match share covers every token.
    assert (
        shares["composed"]
        <= 1 - torch.maximum(shares["attention"], torch.maximum(shares["mlp"], shares["previous"])) + 1e-12
    ).all()
