"""How blocks change class evidence (docs/methods.md, "Categorical updates" and "Residual composition").

Both work on the projections of the residual stream and the sublayer outputs of
one traced pass (:mod:`worker.lens.projection`), over image tokens.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

from worker.lens.projection import ClassProjection
from worker.lens.vit import trace


def stream_logits(
    model: VisionTransformer, images: torch.Tensor, projection: ClassProjection
) -> dict[str, torch.Tensor]:
    """Logits ``[B, L, N, C]`` at image tokens of ``x_{b-1}``, ``x'``, ``x_b``, ``a_b`` and ``m_b`` for every block."""
    spec = projection.spec
    with torch.no_grad():
        run = trace(model, images, sublayers=True)
        assert run.attention is not None
        assert run.mlp is not None
        last = run.residual[:, -1:]
        before, after = run.residual[:, :-1], run.residual[:, 1:]
        middle = before + run.attention
        stacked = torch.cat([before, middle, after, run.attention, run.mlp], dim=1)[:, :, spec.num_prefix :]
        logits = projection(stacked, last[:, :, spec.num_prefix :]).split(spec.depth, dim=1)
    return dict(zip(("before", "middle", "after", "attention", "mlp"), logits, strict=True))


def categorical_updates(
    model: VisionTransformer,
    images: torch.Tensor,
    targets: torch.Tensor,
    projection: ClassProjection | None = None,
    logits: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Per block, for each image's target class (``targets``: ``[B]``), averaged over images and image tokens:

    - ``rises``: share of image tokens whose class logit rises from ``x_{b-1}`` to ``x_b``;
    - ``attention_update``: mean of ``z_c(a_b) - z_c(x_{b-1})``;
    - ``mlp_update``: mean of ``z_c(m_b) - z_c(x')``.
    Each ``[L]``. ``logits``: :func:`stream_logits` of ``images``, when the caller has them already.
    """
    if logits is None:
        logits = stream_logits(model, images, projection or ClassProjection(model))

    def target(name: str) -> torch.Tensor:
        values = logits[name]
        index = targets.to(values.device)[:, None, None, None].expand(-1, values.shape[1], values.shape[2], 1)
        return values.gather(-1, index)[..., 0]  # [B, L, N]

    before, middle, after = target("before"), target("middle"), target("after")
    return {
        "rises": (after > before).double().mean(dim=(0, 2)),
        "attention_update": (target("attention") - before).double().mean(dim=(0, 2)),
        "mlp_update": (target("mlp") - middle).double().mean(dim=(0, 2)),
    }


def residual_composition(
    model: VisionTransformer,
    images: torch.Tensor,
    projection: ClassProjection | None = None,
    logits: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Per block, the share of image tokens whose top-1 class at ``x_b`` equals the top-1 of ``a_b``
    (``attention``), of ``m_b`` (``mlp``), of ``x_{b-1}`` (``previous``), or of none of them (``composed``).

    The first three can overlap (one token's top-1 may match several); ``composed`` is exclusive. Each ``[L]``.
    ``logits``: :func:`stream_logits` of ``images``, when the caller has them already.
    """
    if logits is None:
        logits = stream_logits(model, images, projection or ClassProjection(model))
    top = {name: values.argmax(dim=-1) for name, values in logits.items()}
    result = {
        "attention": top["after"] == top["attention"],
        "mlp": top["after"] == top["mlp"],
        "previous": top["after"] == top["before"],
    }
    result["composed"] = ~(result["attention"] | result["mlp"] | result["previous"])
    return {name: matches.double().mean(dim=(0, 2)) for name, matches in result.items()}
