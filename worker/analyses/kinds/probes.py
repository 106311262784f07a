"""``probes``: held-out accuracy of a linear probe at every layer, beside the class-embedding projection's."""

from __future__ import annotations

from typing import Any, cast

import torch

from worker.analyses import figures
from worker.analyses.job import AnalysisError, AnalysisJob, AnalysisOutcome, layer_spec, model_name, numbers
from worker.analyses.layer_probes import SPLIT_RULE, layer_probes, probe_positions
from worker.runtime import LoadedModel


def check(job: AnalysisJob) -> None:
    """Nothing up front beyond the kind's rules (labels): a position the model lacks is refused by its part."""


def run(job: AnalysisJob) -> AnalysisOutcome:
    job.steps.plan(len(job.spans))
    data = part(job, job.models[0])
    return AnalysisOutcome(data, {"probes": figure(data)})


def part(job: AnalysisJob, loaded: LoadedModel) -> dict[str, Any]:
    """The probes' accuracy per layer and position of ``loaded`` (labels needed), as JSON-ready numbers."""
    assert job.labels is not None
    network = loaded.network
    try:
        positions = probe_positions(layer_spec(loaded), job.request.representation)
    except ValueError as error:
        raise AnalysisError(f"{model_name(loaded)}: {error}") from error
    labelled = ((batch, cast(torch.Tensor, labels)) for batch, labels in job.labelled(loaded))
    curves = layer_probes(
        network, job.steps.over(labelled), len(loaded.labels), job.request.representation, job.request.ridge
    )
    return {
        "model": model_name(loaded),
        "layers": curves.layers,
        "positions": positions,
        "split": {"rule": SPLIT_RULE, "train": curves.train, "test": curves.test},
        "ridge": job.request.ridge,
        "probes": {position: numbers(values, 4) for position, values in curves.accuracy.items()},
        "projection": None if curves.projection is None else numbers(curves.projection, 4),
        "projection_convention": {"norm": "fresh", "bias": True, "readout": "the model's pooled read-out"},
        "chance": round(1 / len(loaded.labels), 4),
    }


def figure(data: dict[str, Any]) -> bytes:
    curves: dict[str, Any] = {f"probe, {position}": values for position, values in data["probes"].items()}
    if data["projection"] is not None:
        curves["class-embedding projection"] = data["projection"]
    return figures.layer_curves(
        data["layers"],
        curves,
        title=f"{data['model']}: held-out accuracy per layer ({data['split']['test']} images)",
        ylabel="accuracy",
        limits=(0.0, 1.02),
        reference=(data["chance"], "chance"),
    )
