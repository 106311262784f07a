"""``token-probes``: ridge probes at every layer and token position against the class-embedding projection.

docs/methods.md, "Linear probes per token position": full and few-shot probes per layer and
position, the projection's top-1 accuracy beside them, and the probes' relevance maps at one
layer scored by token removal beside the projection's (:mod:`worker.analyses.token_probes`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import numpy as np
import torch

from worker.analyses import figures
from worker.analyses.job import AnalysisJob, AnalysisOutcome, model_name, numbers, open_vit
from worker.analyses.layer_probes import SPLIT_RULE, held_out
from worker.analyses.token_probes import FEW_SHOT, RANDOM_SEED, map_faithfulness, passes, token_probes
from worker.runtime import LoadedModel

EXAMPLES = 3  # held-out images whose own maps the figure shows
PROTOCOL = (
    "remove the top (positive) or bottom (negative) k% of image tokens by the map after the position embedding, "
    "k = 0, 10, ..., 90; AUC: trapezoid over k divided by the range (worker/lens/faithfulness.py)"
)


def check(job: AnalysisJob) -> None:
    """Nothing beyond the kind's rules (labels, a ViT, ``layer`` 0..L)."""


def run(job: AnalysisJob) -> AnalysisOutcome:
    loaded = job.models[0]
    model, spec = open_vit(loaded, "token-probes")
    count = len(job.images)
    layer = spec.depth if job.request.layer is None else job.request.layer
    job.steps.plan((passes(spec, count) + 1) * len(job.spans))

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return ((batch, cast(torch.Tensor, labels)) for batch, labels in job.steps.over(job.labelled(loaded)))

    probes = token_probes(model, batches, count, len(loaded.labels), layer, job.request.ridge)
    faithfulness = map_faithfulness(
        model, _held_out(job, loaded), {"probe": probes.probe_maps, "projection": probes.projection_maps}
    )
    layers = ["embedding", *(f"block {b}" for b in range(1, spec.depth + 1))]
    image = slice(int(probes.positions[0] == "cls"), None)
    accuracy = {key: np.asarray(values) for key, values in probes.accuracy.items()}
    h, w = spec.grid
    data: dict[str, Any] = {
        "model": model_name(loaded),
        "layers": layers,
        "positions": probes.positions,
        "split": {"rule": SPLIT_RULE, "train": probes.train, "test": probes.test},
        "few_shot": {
            "per_class": FEW_SHOT,
            "train": probes.few_shot_train,
            "rule": "the first fitting images of each class",
        },
        "ridge": job.request.ridge,
        "accuracy": {key: numbers(values, 4) for key, values in accuracy.items()},
        "cls": {key: numbers(values[:, 0], 4) for key, values in accuracy.items()} if image.start else None,
        "image_tokens": {key: numbers(values[:, image].mean(axis=1), 4) for key, values in accuracy.items()},
        "projection_convention": {"norm": "fresh", "bias": True, "head": "main"},
        "chance": round(1 / len(loaded.labels), 4),
        "maps": {
            "layer": layer,
            "layer_name": layers[layer],
            "target": "true class",
            "images": probes.test,
            "probe": numbers(probes.probe_maps.mean(dim=0).reshape(h, w), 4),
            "projection": numbers(probes.projection_maps.mean(dim=0).reshape(h, w), 4),
            "probe_accuracy": numbers(accuracy["probe"][layer, image].reshape(h, w), 4),
            "projection_accuracy": numbers(accuracy["projection"][layer, image].reshape(h, w), 4),
            "examples": [
                {
                    "image": int(index),
                    "probe": numbers(probes.probe_maps[row].reshape(h, w), 4),
                    "projection": numbers(probes.projection_maps[row].reshape(h, w), 4),
                }
                for row, index in enumerate(torch.nonzero(held_out(count)).flatten()[:EXAMPLES].tolist())
            ],
        },
        "faithfulness": {"protocol": PROTOCOL, "random_seed": RANDOM_SEED, **faithfulness},
    }
    return AnalysisOutcome(data, figures_of(data))


def _held_out(job: AnalysisJob, loaded: LoadedModel) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The held-out images of every batch, with their labels, in request order."""
    test = held_out(len(job.images))
    for (start, stop), (batch, labels) in zip(job.spans, job.steps.over(job.labelled(loaded)), strict=True):
        rows = test[start:stop].to(batch.device)
        if rows.any():
            yield batch[rows], cast(torch.Tensor, labels)[rows]


def figures_of(data: dict[str, Any]) -> dict[str, bytes]:
    names = {"probe": "probe", "few_shot": f"few-shot probe ({data['few_shot']['per_class']} per class)"}
    names["projection"] = "class-embedding projection"
    curves: dict[str, Any] = {}
    for where, series in (("CLS", data["cls"]), ("image tokens (mean)", data["image_tokens"])):
        if series is not None:
            curves.update({f"{names[key]}, {where}": values for key, values in series.items()})
    accuracy = figures.layer_curves(
        data["layers"],
        curves,
        title=f"{data['model']}: held-out top-1 accuracy per layer ({data['split']['test']} images)",
        ylabel="accuracy",
        limits=(0.0, 1.02),
        reference=(data["chance"], "chance"),
    )
    maps = data["maps"]
    shown = [maps["probe"], maps["projection"]]
    titles = ["probe, mean", "projection, mean"]
    for example in maps["examples"]:
        shown += [example["probe"], example["projection"]]
        titles += [f"probe, image {example['image']}", f"projection, image {example['image']}"]
    scaled = [_scaled(np.asarray(values, dtype=np.float64)) for values in shown]
    relevance = figures.map_grid(
        scaled,
        titles,
        title=f"{data['model']}: relevance of the true class at {maps['layer_name']}",
        colour_label="probe score or projection logit / the map's largest magnitude",
        columns=2,
    )
    removal: dict[str, Any] = {}
    for method, label in (("probe", "probe map"), ("projection", "projection map"), ("random", "random order")):
        for direction in ("positive", "negative"):
            curve = data["faithfulness"][method][direction]
            removal[f"{direction}, {label} (AUC {curve['auc']['accuracy']:.3f})"] = curve["accuracy"]
    fractions = data["faithfulness"]["probe"]["positive"]["fractions"]
    faithfulness = figures.removal_curves(
        fractions, removal, title=f"{data['model']}: token removal at {maps['layer_name']}", ylabel="accuracy"
    )
    return {"token_probes": accuracy, "token_probes_maps": relevance, "token_probes_faithfulness": faithfulness}


def _scaled(values: np.ndarray) -> np.ndarray:
    top = np.nanmax(np.abs(values)) if values.size else 0.0
    return values / top if top > 0 else values
