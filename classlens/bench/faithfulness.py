"""The relevance methods that faithfulness evaluation compares, all as ``(images, targets) -> [B, K, N]``."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

from classlens.core.contract import MapKind
from worker.lens.baselines import attention_rollout, chefer_relevance, grad_cam, random_relevance
from worker.lens.explain import projection_map
from worker.lens.faithfulness import RelevanceMethod
from worker.lens.gradient import gradient_relevance
from worker.lens.projection import ClassProjection


def relevance_methods(model: VisionTransformer, layer: int, map_kind: MapKind, seed: int) -> dict[str, RelevanceMethod]:
    projection = ClassProjection(model)
    generator = torch.Generator().manual_seed(seed)  # created once: it advances from batch to batch
    tokens = projection.spec.num_image_tokens
    return {
        "projection": lambda images, targets: projection_map(model, images, targets, projection, layer, map_kind),
        "gradient": lambda images, targets: gradient_relevance(images, targets, projection),
        "random": lambda images, targets: random_relevance(images, targets, tokens, generator),
        "chefer": lambda images, targets: chefer_relevance(model, images, targets),
        "rollout": lambda images, targets: attention_rollout(model, images, targets),
        "gradcam": lambda images, targets: grad_cam(model, images, targets),
    }
