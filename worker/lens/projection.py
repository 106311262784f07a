"""Class-embedding projection (METHODS.md section 1, "Projection"; Vilas et al., NeurIPS 2023).

``z(v) = E F(v) + beta``: the classifier's class embeddings ``E = head.weight``
applied to any ``D``-vector after the model's final norm ``F`` (``model.norm``
for CLS-pooled models, ``model.fc_norm`` for GAP models). Two documented
choices, always reported with the result:

- ``norm="fresh"`` (default, the paper's): ``F`` recomputes mean and variance
  from ``v`` itself. ``norm="cached"`` (the ViT-Prisma convention): ``v`` is
  centred on its own mean but divided by the scale the final norm applied to the
  last layer's vector at the same token position.
- ``bias=False`` drops the head bias ``beta``.

:meth:`ClassProjection.pooled` reads a layer out the way the model reads its last
layer (CLS token, GAP of image tokens, or DeiT's average of the CLS and
distillation heads), so that at the last layer it equals the model's logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast

import torch
import torch.nn.functional as F
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from worker.lens.vit import inspect_vit

NormMode = Literal["fresh", "cached"]


@dataclass(frozen=True)
class ProjectionSettings:
    norm: NormMode = "fresh"
    bias: bool = True


class ClassProjection:
    """Project hidden states of one ViT onto its class embeddings."""

    def __init__(self, model: VisionTransformer, settings: ProjectionSettings = ProjectionSettings()):
        self.spec = inspect_vit(model)
        self.settings = settings
        self.final_norm: nn.Module = model.fc_norm if self.spec.pooling == "avg" else model.norm
        if isinstance(self.final_norm, nn.Identity):
            raise ValueError("the model has no final norm to apply")
        if settings.norm == "cached" and not isinstance(self.final_norm, nn.LayerNorm):
            raise ValueError("the cached-scale projection needs a LayerNorm as final norm")
        # (token selector, head): the model's own readout of its last layer.
        # inspect_vit has checked that the head is one linear layer.
        head = cast(nn.Linear, model.head)
        self.readouts: list[tuple[int | None, nn.Linear]] = [(None if self.spec.pooling == "avg" else 0, head)]
        if isinstance(model, VisionTransformerDistilled):
            self.readouts.append((1, cast(nn.Linear, model.head_dist)))

    def normalise(self, v: torch.Tensor, scale_from: torch.Tensor | None = None) -> torch.Tensor:
        """``F(v)``; with the cached convention, the scale comes from ``scale_from`` (same shape, or broadcastable)."""
        if self.settings.norm == "fresh":
            return self.final_norm(v)
        if scale_from is None:
            raise ValueError("the cached-scale projection needs the last layer's vectors")
        norm = self.final_norm
        assert isinstance(norm, nn.LayerNorm)
        scale = torch.sqrt(scale_from.var(dim=-1, unbiased=False, keepdim=True) + norm.eps)
        centred = v - v.mean(dim=-1, keepdim=True)
        return centred / scale * norm.weight + norm.bias

    def _linear(self, head: nn.Linear, normalised: torch.Tensor) -> torch.Tensor:
        bias = head.bias if self.settings.bias else None
        return F.linear(normalised, head.weight, bias)

    def __call__(self, v: torch.Tensor, scale_from: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[..., C]`` of every ``D``-vector in ``v`` under the class embedding of the main head."""
        return self._linear(self.readouts[0][1], self.normalise(v, scale_from))

    def pooled(self, tokens: torch.Tensor, last_layer: torch.Tensor | None = None) -> torch.Tensor:
        """The model's readout applied to token sequences ``[..., T, D]`` of any layer: ``[..., C]``.

        ``last_layer`` (``[..., T, D]`` of ``x_L``) supplies the cached scale.
        """
        total = None
        for token, head in self.readouts:
            vector = self._select(tokens, token)
            reference = None if last_layer is None else self._select(last_layer, token)
            logits = self._linear(head, self.normalise(vector, reference))
            total = logits if total is None else total + logits
        assert total is not None
        return total / len(self.readouts)

    def _select(self, tokens: torch.Tensor, token: int | None) -> torch.Tensor:
        if token is None:
            return tokens[..., self.spec.num_prefix :, :].mean(dim=-2)
        return tokens[..., token, :]
