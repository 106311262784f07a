"""What every analysis kind's runner is given and gives back.

A runner (one module per kind in :mod:`worker.analyses.kinds`) is handed an
:class:`AnalysisJob`: the request, the loaded model(s), the images (fed in batches of
``request.batch_size``, preprocessed for each model as its manifest says; a last batch under
4 images joins the one before), the labels if any, and the progress to advance. It returns an
:class:`AnalysisOutcome`: JSON-ready numbers and the figures drawn from them. The helpers here
turn tensors into those numbers and open a model as the ViT a kind needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import numpy as np
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from classlens.core.contract import ANALYSIS_MIN_IMAGES, AnalysisRequest
from worker.analyses.representations import LayerSpec, RepresentationError, describe
from worker.lens.vit import UnsupportedModelError, ViTSpec, inspect_vit
from worker.model_loader import create_architecture
from worker.runtime import LoadedModel

Progress = Callable[[int, int], None]  # (done, total), called as the work advances

DECIMALS = 6
# The seed of the random-initialised copy that memories and significance compare a model with.
RANDOM_COPY_SEED = 0

_T = TypeVar("_T")


class AnalysisError(ValueError):
    """A request the analysis cannot honour (e.g. probes without labels, a CNN for attention distance)."""


@dataclass
class AnalysisOutcome:
    data: dict[str, Any]  # JSON-able numbers behind the figures (AnalysisResult.data)
    figures: dict[str, bytes] = field(default_factory=dict)  # name -> PNG bytes ("report" -> HTML bytes)


class Steps:
    """Progress over batch passes: ``total`` is set once the plan is known, ``over`` advances it."""

    def __init__(self, progress: Progress):
        self.progress, self.done, self.total = progress, 0, 0

    def plan(self, total: int) -> None:
        self.total = total
        self.progress(self.done, self.total)

    def over(self, items: Iterable[_T]) -> Iterator[_T]:
        for item in items:
            yield item  # resumed when the consumer asks for the next batch: this one is done
            self.done += 1
            self.progress(self.done, max(self.total, self.done))


@dataclass
class AnalysisJob:
    request: AnalysisRequest
    models: list[LoadedModel]
    images: list[Image.Image]
    labels: torch.Tensor | None
    steps: Steps

    @property
    def spans(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of every batch; a last batch under 4 images joins the one before."""
        size, count = self.request.batch_size, len(self.images)
        spans = [(start, min(start + size, count)) for start in range(0, count, size)]
        if len(spans) > 1 and spans[-1][1] - spans[-1][0] < ANALYSIS_MIN_IMAGES:
            spans[-2:] = [(spans[-2][0], count)]
        return spans

    def batches(self, loaded: LoadedModel) -> Iterator[torch.Tensor]:
        for start, stop in self.spans:
            yield loaded.preprocess(self.images[start:stop])

    def labelled(self, loaded: LoadedModel) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        for (start, stop), batch in zip(self.spans, self.batches(loaded), strict=True):
            yield batch, None if self.labels is None else self.labels[start:stop].to(loaded.device)


def label_tensor(labels: np.ndarray | None, count: int) -> torch.Tensor | None:
    """The labels as a tensor of class indices, one per image (None: no labels)."""
    if labels is None:
        return None
    values = np.asarray(labels)
    if values.shape != (count,):
        raise AnalysisError(f"{values.size} labels for {count} images: give one class index per image")
    if not np.issubdtype(values.dtype, np.integer):
        raise AnalysisError(f"labels must be class indices (integers), got {values.dtype}")
    return torch.from_numpy(values.astype(np.int64))


def model_name(loaded: LoadedModel) -> str:
    return loaded.entry.reference


def open_vit(loaded: LoadedModel, kind: str) -> tuple[VisionTransformer, ViTSpec]:
    """The model as the ViT the lens opens, and its layout; an :class:`AnalysisError` naming ``kind`` if not one."""
    network = loaded.network
    try:
        spec = inspect_vit(network)
    except UnsupportedModelError as error:
        raise AnalysisError(
            f"{kind} needs a Vision Transformer: {model_name(loaded)} cannot be used ({error})"
        ) from error
    return cast(VisionTransformer, network), spec


def random_copy(loaded: LoadedModel) -> VisionTransformer:
    """A random-initialised model of ``loaded``'s architecture, seeded (the global RNG is left as it was).

    What chance looks like for the statistics that compare a trained model with untrained weights.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_COPY_SEED)
        network = create_architecture(loaded.entry.manifest)
    network = network.eval().to(loaded.device)
    assert isinstance(network, VisionTransformer)
    return network


def is_lens_vit(loaded: LoadedModel) -> bool:
    """Whether the lens opens the model (a timm ViT of a layout it knows)."""
    try:
        inspect_vit(loaded.network)
    except UnsupportedModelError:
        return False
    return True


def layer_spec(loaded: LoadedModel) -> LayerSpec:
    """The layers a representation analysis reads from the model; an error names the model."""
    try:
        return describe(loaded.network)
    except RepresentationError as error:
        raise AnalysisError(f"{model_name(loaded)}: {error}") from error


def numbers(values: Any, decimals: int = DECIMALS) -> Any:
    """Nested lists of floats rounded to ``decimals``; NaN and infinities (no JSON for them) become None."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    array = np.round(np.asarray(values, dtype=np.float64), decimals)
    return _finite(array.tolist())


def _finite(value: Any) -> Any:
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value if math.isfinite(value) else None
