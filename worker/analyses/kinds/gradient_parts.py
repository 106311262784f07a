"""``gradient-parts``: the gradient relevance map of every image, taken apart by block and by head.

docs/methods.md, "Gradient relevance map by block and head": block ``b``'s and head ``h``'s
term ``-d l_b / d A_b[h, CLS, j]`` of the map, before the sums (:mod:`worker.lens.gradient_parts`).
The target is each image's true class with labels, its predicted class without. Maps are
averaged over the images; each image's share of absolute relevance per block and head is
averaged too (a share is comparable across images, a signed map less so).
"""

from __future__ import annotations

from typing import Any

import torch

from worker.analyses import figures
from worker.analyses.job import AnalysisJob, AnalysisOutcome, model_name, numbers, open_vit
from worker.lens.gradient import gradient_parts
from worker.lens.projection import ClassProjection


def check(job: AnalysisJob) -> None:
    """Nothing beyond the kind's rules (a ViT; ``layer`` a block, checked by the registry)."""


def run(job: AnalysisJob) -> AnalysisOutcome:
    loaded = job.models[0]
    model, spec = open_vit(loaded, "gradient-parts")
    projection = ClassProjection(model)
    job.steps.plan(len(job.spans))
    total = torch.zeros(spec.depth, spec.num_heads, spec.num_image_tokens, dtype=torch.float64)
    shares = torch.zeros(spec.depth, spec.num_heads, dtype=torch.float64)
    count = 0
    for batch, labels in job.steps.over(job.labelled(loaded)):
        if labels is None:
            with torch.no_grad():
                labels = model(batch).argmax(dim=-1)
        parts = gradient_parts(batch, labels, projection).double().cpu()  # [B, L, H, N]
        total += parts.sum(dim=0)
        magnitude = parts.abs().sum(dim=-1)  # [B, L, H]
        shares += (magnitude / magnitude.sum(dim=(1, 2), keepdim=True).clamp_min(1e-300)).sum(dim=0)
        count += len(batch)
    mean = (total / count).reshape(spec.depth, spec.num_heads, *spec.grid)
    block = job.request.layer or spec.depth
    head_share = shares / count
    data = {
        "model": model_name(loaded),
        "layers": [f"block {b}" for b in range(1, spec.depth + 1)],
        "heads": spec.num_heads,
        "grid": list(spec.grid),
        "images": count,
        "targets": "true class" if job.labels is not None else "predicted class",
        "loss": "l_b = cross_entropy(z(a_b[query]), c), one log-softmax; z fresh-norm, with bias",
        "queries": "CLS row" if projection.readouts[0].pooling == "token" else "image-token rows, summed",
        "map": numbers(mean.sum(dim=(0, 1)), 6),
        "block_maps": numbers(mean.sum(dim=1), 6),
        "head_block": block,
        "head_maps": numbers(mean[block - 1], 6),
        "parts": numbers(mean, 6),
        "block_share": numbers(head_share.sum(dim=1), 4),
        "head_share": numbers(head_share, 4),
    }
    return AnalysisOutcome(data, figures_of(data))


def figures_of(data: dict[str, Any]) -> dict[str, bytes]:
    count, targets = data["images"], data["targets"]
    shares = data["block_share"]
    blocks = figures.map_grid(
        [data["map"], *data["block_maps"]],
        ["sum of all blocks"] + [f"{name} ({share:.0%})" for name, share in zip(data["layers"], shares, strict=True)],
        title=f"{data['model']}: gradient map of the {targets} by block, mean of {count} images",
        colour_label="-d l_b / d A_b[CLS, j], summed over heads",
        columns=min(7, len(data["layers"]) + 1),
    )
    block = data["head_block"]
    head_shares = data["head_share"][block - 1]
    heads = figures.map_grid(
        data["head_maps"],
        [f"head {h} ({share:.0%})" for h, share in enumerate(head_shares)],
        title=f"{data['model']}: block {block} by head, mean of {count} images",
        colour_label=f"-d l_{block} / d A_{block}[h, CLS, j]",
    )
    return {"gradient_parts_blocks": blocks, "gradient_parts_heads": heads}
