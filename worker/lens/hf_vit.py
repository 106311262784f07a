"""Hugging Face transformers ViT and DeiT classifiers.

``ViTForImageClassification``, ``DeiTForImageClassification`` and
``DeiTForImageClassificationWithTeacher`` share one pre-norm layer:
``x' = x + attention(layernorm_before(x))`` and ``x_b = x' + mlp(layernorm_after(x'))``
(dropout is the identity in eval mode), the backbone's ``layernorm`` is the final norm
``F``, and the classifier reads the CLS token (DeiT with teacher: the mean of the CLS
head and the distillation head, which reads the distillation token). So ``a_b`` is the
attention module's first output and ``m_b`` the MLP module's output.

Attention probabilities exist only with eager attention (the model loader builds these
models with it). For the gradient map they must be leaves of the autograd graph; in
transformers they come from a function (the attention interface), not a module one could
hook, so the lens registers its own attention function, equal to the eager one but for
making the probabilities leaves, and selects it on the model's config for that one pass.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any, cast

import torch
from torch import nn

from worker.lens.adapter import (
    LensModel,
    Readout,
    TensorSink,
    UnsupportedModelError,
    ViTSpec,
    hooked,
    linear_head,
    pair,
)

# The classes the lens opens: (backbone attribute, heads as (attribute, token read)).
SUPPORTED: dict[str, tuple[str, tuple[tuple[str, int], ...]]] = {
    "ViTForImageClassification": ("vit", (("classifier", 0),)),
    "DeiTForImageClassification": ("deit", (("classifier", 0),)),
    "DeiTForImageClassificationWithTeacher": ("deit", (("cls_classifier", 0), ("distillation_classifier", 1))),
}
LEAF_ATTENTION = "classlens-leaves"
# The attention interface is a process-wide registry: one leaf-recording pass at a time.
_LEAF_LOCK = threading.Lock()


class HFViT(LensModel):
    family = "transformers-vit"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        name = type(model).__name__
        if name not in SUPPORTED:
            raise UnsupportedModelError(
                f"transformers {name} is not supported; supported: {', '.join(SUPPORTED)} "
                "(pre-norm ViT encoders with a linear classifier on the CLS or distillation token)"
            )
        backbone_name, heads = SUPPORTED[name]
        self.backbone = cast(nn.Module, getattr(model, backbone_name))
        layers = getattr(self.backbone, "layers", None)
        if not isinstance(layers, nn.ModuleList) or not all(hasattr(layer, "mlp") for layer in layers):
            raise UnsupportedModelError(
                f"{name}: this transformers version lays the encoder out differently (no layers[i].mlp); "
                "the lens reads the layout of transformers 5"
            )
        self._layers = list(layers)
        config = cast(Any, model).config
        self.readouts = tuple(Readout(linear_head(getattr(model, attr), attr), "token", token=t) for attr, t in heads)
        self.final_norm = cast(nn.Module, self.backbone.layernorm)
        self.norm_before_pool = False
        image, patch = pair(config.image_size), pair(config.patch_size)
        prefix = ("cls", "dist") if backbone_name == "deit" else ("cls",)
        self.spec = ViTSpec(
            prefix_tokens=prefix,
            grid=(image[0] // patch[0], image[1] // patch[1]),
            patch_size=patch,
            depth=len(self._layers),
            width=int(config.hidden_size),
            num_classes=self.readouts[0].head.out_features,
            num_heads=int(config.num_attention_heads),
            pooling="token",
        )
        self.input_shape = (int(config.num_channels), *image)

    def blocks(self) -> list[nn.Module]:
        return self._layers

    def branches(self, block: nn.Module) -> tuple[nn.Module, nn.Module]:
        return cast(nn.Module, block.attention), cast(nn.Module, block.mlp)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.model(pixel_values=images).logits)

    def attention_probabilities(self, store: TensorSink, as_leaves: bool = False) -> AbstractContextManager[None]:
        config = cast(Any, self.model).config
        if as_leaves:
            assert isinstance(store, list), "leaves are kept for autograd: pass a list"
            return _leaf_attention(config, store)
        if config._attn_implementation != "eager":
            raise UnsupportedModelError(
                f"attention probabilities need eager attention; this model uses {config._attn_implementation!r}"
            )
        return _recorded(self._layers, store)


@contextmanager
def _recorded(layers: list[nn.Module], store: TensorSink) -> Iterator[None]:
    """Each layer's attention weights: the second output of its (eager) attention module."""

    def hook(module: nn.Module, inputs: Any, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        store.append(output[1])

    with ExitStack() as stack:
        for layer in layers:
            stack.enter_context(hooked(cast(nn.Module, layer.attention), hook))
        yield


def _eager_with_leaves(store: list[torch.Tensor]) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """Eager attention (``softmax(q k^T * scaling + mask) v``) whose probabilities are leaves kept in ``store``."""

    def attend(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.matmul(query, key.transpose(2, 3)) * (query.size(-1) ** -0.5 if scaling is None else scaling)
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype).detach().requires_grad_(True)
        store.append(probs)
        return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs

    return attend


@contextmanager
def _leaf_attention(config: Any, store: list[torch.Tensor]) -> Iterator[None]:
    from transformers import AttentionInterface

    with _LEAF_LOCK:
        AttentionInterface.register(LEAF_ATTENTION, _eager_with_leaves(store))
        saved = config._attn_implementation_internal
        # The private field, not the property: the property's setter validates against the installed kernels.
        config._attn_implementation_internal = LEAF_ATTENTION
        try:
            yield
        finally:
            config._attn_implementation_internal = saved
