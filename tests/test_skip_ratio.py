import timm
import torch

from worker.analyses.skip_ratio import skip_ratios
from worker.lens.vit import trace


def test_skip_ratios_match_a_direct_computation():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3).eval()
    batches = [torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)]
    ratios = skip_ratios(model, batches)
    with torch.no_grad():
        run = trace(model, torch.cat(batches))
    x = run.residual[:, :-1]
    direct_attention_cls = (x[:, :, 0].norm(dim=-1) / run.attention[:, :, 0].norm(dim=-1)).mean(0)
    middle = x + run.attention
    direct_mlp_image = (middle[:, :, 1:].norm(dim=-1) / run.mlp[:, :, 1:].norm(dim=-1)).mean(dim=(0, 2))
    assert torch.allclose(ratios["attention_cls"], direct_attention_cls.double(), rtol=1e-5)
    assert torch.allclose(ratios["mlp_image"], direct_mlp_image.double(), rtol=1e-5)
    assert set(ratios) == {"attention_cls", "attention_image", "mlp_cls", "mlp_image"}


def test_a_branch_scaled_down_raises_its_ratio():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2).eval()
    images = [torch.randn(2, 3, 32, 32)]
    before = skip_ratios(model, images)["mlp_image"][1]
    with torch.no_grad():
        model.blocks[1].mlp.fc2.weight.mul_(0.1)
        model.blocks[1].mlp.fc2.bias.mul_(0.1)
    after = skip_ratios(model, images)["mlp_image"][1]
    assert after > 5 * before
