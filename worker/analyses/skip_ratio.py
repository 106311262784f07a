"""Skip-connection ratio per block and sublayer (docs/methods.md; Raghu et al., NeurIPS 2021).

``||z|| / ||f(z)||`` with ``z`` the residual input of the branch and ``f(z)`` its
output: for attention ``z = x_{b-1}``, ``f(z) = a_b``; for the MLP
``z = x' = x_{b-1} + a_b``, ``f(z) = m_b``. Reported for the CLS (first prefix)
token and for image tokens, aggregated as the mean of per-token ratios over
images (and, for image tokens, over tokens). A large ratio means the block
mostly passes its input through.

For a ResNet-family CNN (:func:`cnn_skip_ratios`) the same ratio is taken per residual
block, between the shortcut and the residual branch, at every spatial position.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import ExitStack
from typing import Any, cast

import torch
from timm.models.resnet import BasicBlock, Bottleneck
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from worker.lens.vit import hooked, inspect_vit, trace


def skip_ratios(model: VisionTransformer, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"attention_cls", "attention_image", "mlp_cls", "mlp_image"}``: ``[L]`` mean ratios (float64).

    The ``*_cls`` entries are NaN for models without prefix tokens.
    """
    spec = inspect_vit(model)
    sums = {
        key: torch.zeros(spec.depth, dtype=torch.float64)
        for key in ("attention_cls", "attention_image", "mlp_cls", "mlp_image")
    }
    images = 0
    with torch.no_grad():
        for batch in batches:
            run = trace(model, batch, sublayers=True)
            assert run.attention is not None
            assert run.mlp is not None
            inputs = run.residual[:, :-1]
            middle = inputs + run.attention  # x'
            for name, residual, branch in (("attention", inputs, run.attention), ("mlp", middle, run.mlp)):
                ratio = (
                    (residual.norm(dim=-1) / branch.norm(dim=-1).clamp_min(1e-12)).to(torch.float64).cpu()
                )  # [B, L, T]
                sums[f"{name}_image"] += ratio[:, :, spec.num_prefix :].mean(dim=2).sum(dim=0)
                if spec.num_prefix:
                    sums[f"{name}_cls"] += ratio[:, :, 0].sum(dim=0)
            images += len(batch)
    if not images:
        raise ValueError("no images")
    means = {key: value / images for key, value in sums.items()}
    if not spec.num_prefix:
        for key in ("attention_cls", "mlp_cls"):
            means[key] = torch.full_like(means[key], float("nan"))
    return means


def residual_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The residual blocks of a timm ResNet-family CNN (``BasicBlock``, ``Bottleneck``), named as in the model."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, (BasicBlock, Bottleneck))]


def _branch_end(block: nn.Module) -> nn.Module:
    """The last module of the residual branch, whose output is added to the shortcut."""
    for name in ("drop_path", "se"):
        module = getattr(block, name, None)
        if isinstance(module, nn.Module):
            return module
    return cast(nn.Module, block.bn3 if isinstance(block, Bottleneck) else block.bn2)


def cnn_skip_ratios(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, Any]:
    """The skip ratio of a CNN's residual blocks: ``{"blocks": names, "block_image": [blocks] float64}``.

    For ``out = act(f(z) + shortcut(z))`` (timm ``BasicBlock`` / ``Bottleneck``), the ratio
    ``||shortcut(z)|| / ||f(z)||`` at every spatial position (norms over channels), averaged
    over positions and then over images: the CNN counterpart of the image-token ratio.
    """
    blocks = residual_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no ResNet residual blocks (BasicBlock / Bottleneck)")
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    images = 0
    with torch.no_grad():
        for batch in batches:
            norms: dict[tuple[int, str], torch.Tensor] = {}
            with ExitStack() as stack:
                for index, (_, block) in enumerate(blocks):
                    stack.enter_context(hooked(block, _save_norm(norms, index, "input"), pre=True))
                    stack.enter_context(hooked(_branch_end(block), _save_norm(norms, index, "branch")))
                    downsample = getattr(block, "downsample", None)
                    if isinstance(downsample, nn.Module):
                        stack.enter_context(hooked(downsample, _save_norm(norms, index, "shortcut")))
                model(batch)
            for index in range(len(blocks)):
                shortcut = norms.get((index, "shortcut"), norms[index, "input"])
                ratio = shortcut / norms[index, "branch"].clamp_min(1e-12)  # [B, H, W]
                sums[index] += ratio.flatten(1).mean(dim=1).to(torch.float64).sum().cpu()
            images += len(batch)
    if not images:
        raise ValueError("no images")
    return {"blocks": [name for name, _ in blocks], "block_image": sums / images}


def _save_norm(norms: dict[tuple[int, str], torch.Tensor], index: int, role: str) -> Callable[..., None]:
    """A hook storing the channel norm ``[B, H, W]`` of a module's input (pre-hook) or output, at once.

    At once, because the block adds the shortcut to the branch output in place afterwards.
    """

    def hook(module: nn.Module, inputs: Any, output: Any = None) -> None:
        tensor = inputs[0] if role == "input" else output
        norms[index, role] = tensor.norm(dim=1)

    return hook
