"""How blocks change class evidence (docs/methods.md, "Categorical updates" and "Residual composition").

Both work on the projections of the residual stream and the sublayer outputs of
one traced pass (:mod:`worker.lens.projection`), over image tokens.

Where the paper's code (``src/identifiability.py`` of github.com/martinagvilas/vit-cls_emb)
differs. Its categorical update of a sublayer is the share of tokens whose class logit is
higher at the sublayer's output than at the block's input, ``z_c(m_b) > z_c(x_{b-1})`` for
the MLP too; the project's mean MLP update compares ``m_b`` with ``x'``, the stream the MLP
reads. Both are given (``mlp_rises`` is the reference's). Its residual composition tests the
attention output twice and never the MLP's, so a token that only ``m_b`` explains counts as
composed; here each part is tested once, and :func:`mlp_only_share` (tokens that only ``m_b``
explains) is what the reference's composed share adds to ours.
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
    - ``mlp_update``: mean of ``z_c(m_b) - z_c(x')``;
    - ``attention_rises``, ``mlp_rises``: share of image tokens with ``z_c(a_b) > z_c(x_{b-1})``, and with
      ``z_c(m_b) > z_c(x_{b-1})`` (the paper's statistic, against the block's input for both sublayers).
    Each ``[L]``. ``logits``: :func:`stream_logits` of ``images``, when the caller has them already.
    """
    if logits is None:
        logits = stream_logits(model, images, projection or ClassProjection(model))

    def target(name: str) -> torch.Tensor:
        values = logits[name]
        index = targets.to(values.device)[:, None, None, None].expand(-1, values.shape[1], values.shape[2], 1)
        return values.gather(-1, index)[..., 0]  # [B, L, N]

    before, middle, after = target("before"), target("middle"), target("after")
    attention, mlp = target("attention"), target("mlp")
    return {
        "rises": (after > before).double().mean(dim=(0, 2)),
        "attention_update": (attention - before).double().mean(dim=(0, 2)),
        "mlp_update": (mlp - middle).double().mean(dim=(0, 2)),
        "attention_rises": (attention > before).double().mean(dim=(0, 2)),
        "mlp_rises": (mlp > before).double().mean(dim=(0, 2)),
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


def mlp_only_share(
    model: VisionTransformer,
    images: torch.Tensor,
    projection: ClassProjection | None = None,
    logits: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``[L]``: the share of image tokens whose top-1 at ``x_b`` is ``m_b``'s and neither ``a_b``'s nor ``x_{b-1}``'s.

    The paper's code counts these tokens as composed (it never tests ``m_b``): its composed share
    is :func:`residual_composition`'s ``composed`` plus this one.
    """
    if logits is None:
        logits = stream_logits(model, images, projection or ClassProjection(model))
    top = {name: values.argmax(dim=-1) for name, values in logits.items()}
    only = (top["after"] == top["mlp"]) & (top["after"] != top["attention"]) & (top["after"] != top["before"])
    return only.double().mean(dim=(0, 2))
