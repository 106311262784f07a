"""The timm ``Eva`` family (EVA, EVA-02: rotary position embeddings, SwiGLU MLPs, layer-scale gammas).

An ``EvaBlock`` is pre-norm like timm's ``Block``: ``x' = x + drop_path1(gamma_1 * attn(norm1(x)))``
and ``x_b = x' + drop_path2(gamma_2 * mlp(norm2(x')))``. The gammas are parameters, not
modules, so ``a_b`` and ``m_b`` are read where they enter the residual stream: the
outputs of ``drop_path1`` and ``drop_path2`` (each block's own instance; the identity in
eval mode). The rotary embedding is passed to every block and needs nothing of the lens.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import cast

import torch
from timm.models.eva import Eva, EvaAttention, EvaBlock
from torch import nn

from worker.lens.adapter import LensModel, Readout, TensorSink, UnsupportedModelError, ViTSpec, linear_head, pair
from worker.lens.vit import final_norm_of, materialised, pooling_of, timm_problems


class TimmEva(LensModel):
    family = "timm-eva"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        if not isinstance(model, Eva):
            raise UnsupportedModelError(f"{type(model).__name__} is not a timm Eva")
        problems = timm_problems(model, (EvaBlock,), EvaAttention)
        if problems:
            raise UnsupportedModelError("unsupported Eva: " + "; ".join(problems))
        pooling = pooling_of(model.global_pool)
        prefix = (["cls"] if model.cls_token is not None else []) + [
            f"reg{i}" for i in range(getattr(model, "num_reg_tokens", 0) or 0)
        ]
        if len(prefix) != model.num_prefix_tokens:
            raise UnsupportedModelError(f"cannot name the {model.num_prefix_tokens} prefix tokens of this model")
        self.final_norm, before = final_norm_of(model)
        self.norm_before_pool = before and pooling != "token"
        self.readouts = (Readout(linear_head(model.head, "the head"), pooling, token=0, start=len(prefix)),)
        self.spec = ViTSpec(
            prefix_tokens=tuple(prefix),
            grid=pair(model.patch_embed.grid_size),
            patch_size=pair(model.patch_embed.patch_size),
            depth=len(model.blocks),
            width=int(model.embed_dim),
            num_classes=int(model.num_classes),
            num_heads=int(cast(EvaAttention, model.blocks[0].attn).num_heads),
            pooling=pooling,
        )
        self.input_shape = (int(model.patch_embed.proj.in_channels), *pair(model.patch_embed.img_size))

    def blocks(self) -> list[EvaBlock]:
        return cast(list[EvaBlock], list(cast(Eva, self.model).blocks))

    def branches(self, block: nn.Module) -> tuple[nn.Module, nn.Module]:
        return cast(nn.Module, block.drop_path1), cast(nn.Module, block.drop_path2)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.model(images))

    def attention_probabilities(self, store: TensorSink, as_leaves: bool = False) -> AbstractContextManager[None]:
        return materialised([cast(nn.Module, block.attn) for block in self.blocks()], store, as_leaves)
