"""``residual``: categorical updates and residual composition per block of a ViT (docs/methods.md).

Image-weighted means over the batches, of the per-batch values of
:mod:`worker.analyses.residual`; one traced pass per batch serves both.
"""

from __future__ import annotations

from typing import Any

import torch

from worker.analyses import figures
from worker.analyses.job import AnalysisJob, AnalysisOutcome, model_name, numbers, open_vit
from worker.analyses.residual import categorical_updates, mlp_only_share, residual_composition, stream_logits
from worker.lens.projection import ClassProjection

# What each statistic compares, and where the paper's code differs (docs/methods.md).
CONVENTIONS = {
    "update_rises": "share of image tokens with z_c(x_b) > z_c(x_(b-1))",
    "update_attention_update": "mean of z_c(a_b) - z_c(x_(b-1))",
    "update_mlp_update": "mean of z_c(m_b) - z_c(x'): the MLP against the stream it reads (the project's)",
    "update_attention_rises": "share of image tokens with z_c(a_b) > z_c(x_(b-1)) (the reference's)",
    "update_mlp_rises": "share of image tokens with z_c(m_b) > z_c(x_(b-1)) (the reference's comparison)",
    "composition_composed": "share of image tokens whose top-1 at x_b is the top-1 of none of a_b, m_b, x_(b-1); "
    "fixed: the reference code tests a_b twice and never m_b",
    "composition_mlp_only": "share whose top-1 at x_b is m_b's and neither a_b's nor x_(b-1)'s: the reference's "
    "composed share is composition_composed + composition_mlp_only",
}


def check(job: AnalysisJob) -> None:
    """Nothing beyond the kind's rules (a ViT)."""


def run(job: AnalysisJob) -> AnalysisOutcome:
    loaded = job.models[0]
    model, spec = open_vit(loaded, "residual")
    projection = ClassProjection(model)
    job.steps.plan(len(job.spans))
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for batch, labels in job.steps.over(job.labelled(loaded)):
        with torch.no_grad():
            targets = labels if labels is not None else model(batch).argmax(-1)
        logits = stream_logits(model, batch, projection)  # one traced pass serves both analyses
        parts = {
            **{f"update_{k}": v for k, v in categorical_updates(model, batch, targets, logits=logits).items()},
            **{f"composition_{k}": v for k, v in residual_composition(model, batch, logits=logits).items()},
            "composition_mlp_only": mlp_only_share(model, batch, logits=logits),
        }
        for name, value in parts.items():
            sums[name] = sums.get(name, 0) + value.double().cpu() * len(batch)
        count += len(batch)
    data = {
        "model": model_name(loaded),
        "target": "true class" if job.labels is not None else "predicted class",
        "layers": [f"block {b}" for b in range(1, spec.depth + 1)],
        "conventions": CONVENTIONS,
        **{name: numbers(total / count, 4) for name, total in sums.items()},
    }
    return AnalysisOutcome(data, figures_of(data))


def figures_of(data: dict[str, Any]) -> dict[str, bytes]:
    composition = figures.layer_curves(
        data["layers"],
        {
            "x_b top-1 = a_b's": data["composition_attention"],
            "x_b top-1 = m_b's": data["composition_mlp"],
            "x_b top-1 = x_(b-1)'s": data["composition_previous"],
            "none of them": data["composition_composed"],
        },
        title=f"{data['model']}: residual composition (image tokens)",
        ylabel="share of image tokens",
    )
    updates = figures.layer_curves(
        data["layers"],
        {
            f"{data['target']} logit rises (share)": data["update_rises"],
            "attention update z(a_b) - z(x_(b-1))": data["update_attention_update"],
            "MLP update z(m_b) - z(x')": data["update_mlp_update"],
            "attention: z(a_b) > z(x_(b-1)) (share)": data["update_attention_rises"],
            "MLP: z(m_b) > z(x_(b-1)) (share, the reference's)": data["update_mlp_rises"],
        },
        title=f"{data['model']}: categorical updates (image tokens)",
        ylabel="share / logit",
    )
    return {"composition": composition, "updates": updates}
