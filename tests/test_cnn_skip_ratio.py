"""The skip ratio of a ResNet's residual blocks against a block run by hand."""

import pytest
import torch

from tests.test_representations import tiny_resnet
from worker.analyses.skip_ratio import cnn_skip_ratios, residual_blocks


def by_hand(block, x):
    """||shortcut|| / ||branch|| per position, averaged over positions, for one BasicBlock."""
    branch = block.bn2(block.conv2(block.act1(block.bn1(block.conv1(x)))))
    shortcut = x if block.downsample is None else block.downsample(x)
    return (shortcut.norm(dim=1) / branch.norm(dim=1)).flatten(1).mean(dim=1)


def test_cnn_skip_ratios_match_a_block_run_by_hand():
    model = tiny_resnet()
    with torch.no_grad():  # timm zero-initialises each block's last BN gain: the branch would be all zero
        for _, block in residual_blocks(model):
            block.bn2.weight.uniform_(0.5, 1.5)
    images = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    result = cnn_skip_ratios(model, [images[:2], images[2:]])
    assert result["blocks"] == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    inputs = {}
    handles = [
        block.register_forward_pre_hook(lambda module, args, name=name: inputs.setdefault(name, args[0].clone()))
        for name, block in residual_blocks(model)
    ]
    with torch.no_grad():
        model(images)
        for handle in handles:
            handle.remove()
        for index, (name, block) in enumerate(residual_blocks(model)):
            expected = by_hand(block, inputs[name]).mean().item()
            assert result["block_image"][index].item() == pytest.approx(expected, rel=1e-5)
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())


def test_a_model_without_residual_blocks_is_refused():
    with pytest.raises(ValueError, match="no ResNet residual blocks"):
        cnn_skip_ratios(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)), [torch.randn(4, 1, 8, 8)])
