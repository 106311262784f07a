"""``cka``: minibatch CKA between every pair of layers of one model, or of two (docs/methods.md)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from worker.analyses import figures
from worker.analyses.job import AnalysisError, AnalysisJob, AnalysisOutcome, layer_spec, model_name, numbers
from worker.analyses.layer_cka import CKAMatrix, cka_across, cka_within
from worker.analyses.representations import RepresentationError, check_representation


def check(job: AnalysisJob) -> None:
    check_representations(job)


def check_representations(job: AnalysisJob) -> None:
    """Every model offers the representation asked for (a CNN has no CLS token, say)."""
    for loaded in job.models:
        try:
            check_representation(layer_spec(loaded), job.request.representation)
        except RepresentationError as error:
            raise AnalysisError(f"{model_name(loaded)}: {error}") from error


def run(job: AnalysisJob) -> AnalysisOutcome:
    job.steps.plan(len(job.spans))
    data = part(job)
    return AnalysisOutcome(data, {"cka": figure(data)})


def part(job: AnalysisJob) -> dict[str, Any]:
    """The CKA matrix of the job's model (or between its two models) with its layers, as JSON-ready numbers."""
    representation = job.request.representation
    if len(job.models) == 1:
        loaded = job.models[0]
        result = cka_within(loaded.network, job.steps.over(job.batches(loaded)), representation)
        return _data(job, result)
    first, second = job.models
    pairs = zip(job.batches(first), job.batches(second), strict=True)
    result = cka_across(first.network, second.network, job.steps.over(pairs), representation)
    return _data(job, result)


def _data(job: AnalysisJob, result: CKAMatrix) -> dict[str, Any]:
    row_model, column_model = job.models[0], job.models[-1]
    across = len(job.models) == 2  # (the same model twice is still a comparison: all ones on the diagonal)
    data: dict[str, Any] = {
        "representation": job.request.representation,
        "estimator": "minibatch CKA, unbiased HSIC (Nguyen, Raghu & Kornblith 2021), batches weighted by n(n-3), "
        "float64",
        "batch_size": job.request.batch_size,
        "batches": result.batches,
        "examples": result.examples,
        "across": across,
        "rows": {"model": model_name(row_model), "layers": result.rows},
        "columns": {"model": model_name(column_model), "layers": result.columns},
        "matrix": numbers(result.values),
    }
    if across:
        values = result.values.nan_to_num(nan=-math.inf)
        best = values.argmax(dim=1)
        data["best_match"] = [
            {"row": row, "column": result.columns[int(j)], "cka": numbers(result.values[i, j])}
            for i, (row, j) in enumerate(zip(result.rows, best, strict=True))
        ]
        if result.rows == result.columns:  # two versions of one architecture: layer b against layer b
            data["same_layer"] = numbers(result.values.diagonal())
    return data


def figure(data: dict[str, Any]) -> bytes:
    rows, columns = data["rows"], data["columns"]
    models = f"{rows['model']} vs {columns['model']}" if data["across"] else rows["model"]
    title = f"{models}: CKA ({data['representation']}), {data['examples']} images"
    return figures.heatmap(
        np.asarray([[math.nan if v is None else v for v in row] for row in data["matrix"]]),
        rows["layers"],
        columns["layers"],
        title=title,
        row_label=f"{rows['model']} layer",
        column_label=f"{columns['model']} layer",
    )
