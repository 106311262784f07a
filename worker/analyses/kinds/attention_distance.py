"""``attention-distance``: the mean attention distance of every head of a ViT, in pixels (docs/methods.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from worker.analyses import figures
from worker.analyses.attention_distance import PrefixConvention, mean_attention_distance
from worker.analyses.job import AnalysisJob, AnalysisOutcome, model_name, numbers, open_vit
from worker.runtime import LoadedModel


def check(job: AnalysisJob) -> None:
    """Nothing beyond the kind's rules (a ViT)."""


def run(job: AnalysisJob) -> AnalysisOutcome:
    job.steps.plan(len(job.spans))
    data = part(job, job.models[0])
    return AnalysisOutcome(data, {"attention_distance": figure([data])})


def part(job: AnalysisJob, loaded: LoadedModel) -> dict[str, Any]:
    """The distances of ``loaded``'s heads, per block, as JSON-ready numbers."""
    model, spec = open_vit(loaded, "attention-distance")
    prefix: PrefixConvention = job.request.prefix_rows
    distances = mean_attention_distance(model, job.steps.over(job.batches(loaded)), prefix=prefix)
    return {
        "model": model_name(loaded),
        "prefix_rows": job.request.prefix_rows,
        "prefix": prefix,
        "unit": "pixels of the model input",
        "grid": list(spec.grid),
        "patch_size": list(spec.patch_size),
        "layers": [f"block {b}" for b in range(1, spec.depth + 1)],
        "distances": numbers(distances, 4),
        "mean_per_block": numbers(distances.mean(dim=1), 4),
    }


def figure(parts: Sequence[dict[str, Any]]) -> bytes:
    """One scatter of every head of every part (one scale for the models compared)."""
    series = {part["model"]: np.asarray(part["distances"], dtype=np.float64) for part in parts}
    names = " vs ".join(series)
    return figures.head_scatter(series, title=f"{names}: mean attention distance per head ({parts[0]['prefix']})")
