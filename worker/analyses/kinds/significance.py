"""``significance``: per layer, is the trained model's class information greater than a random-initialised copy's?

docs/methods.md, "Trained against random weights: paired tests": the per-image mean
identifiability of the target at image tokens and the per-image key-value agreement, for
the trained model and a random-initialised copy of its architecture (seed 0, as the
``memories`` kind), compared by the Wilcoxon signed-rank test paired by image
(:mod:`worker.analyses.significance`). The target is the same class for both models: the
true class with labels, else the trained model's prediction.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from worker.analyses import figures
from worker.analyses.job import (
    RANDOM_COPY_SEED,
    AnalysisJob,
    AnalysisOutcome,
    model_name,
    numbers,
    open_vit,
    random_copy,
)
from worker.analyses.memories import memory_scores
from worker.analyses.significance import TEST, Alternative, image_agreement, image_identifiability, paired_tests

ALPHA = 0.05
ALTERNATIVE: Alternative = "greater"


def check(job: AnalysisJob) -> None:
    """Nothing beyond the kind's rules (a ViT)."""


def run(job: AnalysisJob) -> AnalysisOutcome:
    loaded = job.models[0]
    model, spec = open_vit(loaded, "significance")
    random_model = random_copy(loaded)
    networks = {"trained": model, "random": random_model}
    scores = {name: memory_scores(network) for name, network in networks.items()}
    job.steps.plan(len(job.spans))
    measures: dict[str, dict[str, list[torch.Tensor]]] = {
        "identifiability": {"trained": [], "random": []},
        "agreement": {"trained": [], "random": []},
    }
    for batch, labels in job.steps.over(job.labelled(loaded)):
        if labels is None:
            with torch.no_grad():
                labels = model(batch).argmax(dim=-1)
        for name, network in networks.items():
            measures["identifiability"][name].append(image_identifiability(network, batch, labels))
            measures["agreement"][name].append(image_agreement(network, scores[name], batch, labels))
    layers = {
        "identifiability": ["embedding", *(f"block {b}" for b in range(1, spec.depth + 1))],
        "agreement": [f"block {b}" for b in range(1, spec.depth + 1)],
    }
    data: dict[str, Any] = {
        "model": model_name(loaded),
        "random_seed": RANDOM_COPY_SEED,
        "targets": "true class" if job.labels is not None else "predicted class (trained model)",
        "images": len(job.images),
        "test": TEST,
        "alternative": f"{ALTERNATIVE}: trained > random",
        "paired_by": "image",
        "alpha": ALPHA,
        "corrected_alpha": {name: round(ALPHA / len(names), 6) for name, names in layers.items()},
        "correction": "Bonferroni over the layers of each measure",
    }
    for measure, values in measures.items():
        trained = torch.cat(values["trained"]).numpy()
        random = torch.cat(values["random"]).numpy()
        data[measure] = _summary(layers[measure], trained, random)
    return AnalysisOutcome(data, {"significance": figure(data)})


def _summary(layers: list[str], trained: np.ndarray, random: np.ndarray) -> dict[str, Any]:
    tests = paired_tests(trained, random, ALTERNATIVE)
    threshold = ALPHA / len(layers)
    return {
        "layers": layers,
        "trained": numbers(trained.mean(axis=0), 4),
        "random": numbers(random.mean(axis=0), 4),
        "trained_median": numbers(np.median(trained, axis=0), 4),
        "random_median": numbers(np.median(random, axis=0), 4),
        "statistic": [test["statistic"] for test in tests],
        "p_value": [float(f"{test['p_value']:.6g}") for test in tests],
        "n": [test["n"] for test in tests],
        "nonzero": [test["nonzero"] for test in tests],
        "significant": [test["p_value"] < threshold for test in tests],
    }


def figure(data: dict[str, Any]) -> bytes:
    panels = []
    for measure, name in (
        ("identifiability", "mean identifiability at image tokens"),
        ("agreement", "key-value agreement (MLP)"),
    ):
        summary = data[measure]
        curves = {"trained": summary["trained"], f"random init (seed {data['random_seed']})": summary["random"]}
        panels.append((name, summary["layers"], curves, summary["significant"]))
    return figures.marked_panels(
        panels,
        title=f"{data['model']}: trained vs random weights, {data['images']} images, {data['targets']}",
        ylabel="mean over images",
        mark_label=f"p < {data['alpha']} / layers (Wilcoxon, one-sided)",
    )
