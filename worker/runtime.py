"""A registered model ready to explain: loaded once per process, on the process's device.

The cache is per process and filled lazily, so a Celery worker loads a model
after it has forked and never shares CUDA state with its parent. The CLI, the
workers and the benchmark all explain through :meth:`LoadedModel.explain`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, cast

import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from classlens.contract import ExplainRequest, Explanation, ModelRef
from classlens.images import fit_to_input
from model_store.catalog import Catalog, ModelEntry
from model_store.manifest import ONNX_EXPLAINER
from worker.lens.explain import explain
from worker.lens.vit import UnsupportedModelError, inspect_vit
from worker.model_loader import load_model
from worker.onnx_explainer import OnnxExplainer, has_explainer, onnxruntime_available
from worker.preprocess import preprocess

log = logging.getLogger(__name__)

# "auto": explain through the manifest's ONNX explainer graph when there is one and onnxruntime
# is installed; "off": always torch (settings.onnx, CLASSLENS_ONNX).
OnnxMode = Literal["auto", "off"]


def default_device() -> torch.device:
    """CUDA when present, else CPU. Call only after fork (it initialises CUDA)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class LoadedModel:
    """A loaded model. ``model`` is a checked ViT, except after ``load(..., require_vit=False)``, where it
    may be any timm model: code that accepts those reads :attr:`network` and checks the type itself."""

    entry: ModelEntry
    model: VisionTransformer
    labels: list[str]
    device: torch.device
    # The ONNX explainer graph, for explain requests that need no gradients (see :func:`load`).
    onnx: OnnxExplainer | None = None

    @property
    def network(self) -> nn.Module:
        """The model as the plain ``nn.Module`` it may be (a CNN when loaded with ``require_vit=False``)."""
        return self.model

    @property
    def ref(self) -> ModelRef:
        manifest = self.entry.manifest
        return ModelRef(name=manifest.name, version=manifest.version, weights_sha256=manifest.weights.sha256)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        manifest = self.entry.manifest
        batch = torch.stack([preprocess(image, manifest.input, manifest.preprocessing) for image in images])
        return batch.to(self.device)

    def as_seen(self, image: Image.Image) -> Image.Image:
        """The image after colour conversion, resize and crop: what the relevance grid covers."""
        manifest = self.entry.manifest
        return fit_to_input(image, manifest.input, manifest.preprocessing)

    def explain(self, images: Sequence[Image.Image], request: ExplainRequest) -> list[Explanation]:
        """Explain through the ONNX graph when loaded and the request needs no gradient map, else torch.

        The streams are the only thing the graph replaces; the results are those of
        torch within the graph's verified tolerance.
        """
        tracer = self.onnx.trace if self.onnx is not None and not request.gradient_map else None
        return explain(self.model, self.preprocess(images), self.labels, request, self.ref, tracer=tracer)


def load(
    entry: ModelEntry, device: torch.device | None = None, *, require_vit: bool = True, onnx: OnnxMode = "auto"
) -> LoadedModel:
    """Load and check a catalog entry (verified weights, a supported ViT).

    ``require_vit=False`` accepts any registered timm model (a CNN, say) for the representation
    analyses, which check what each of them needs (:mod:`worker.analyses.run`).
    ``onnx="auto"`` also opens the manifest's ONNX explainer graph when onnxruntime is
    installed; like the weights, a graph whose checksum differs is refused (``ArtifactError``).
    """
    device = device or default_device()
    model = load_model(entry, device)
    if require_vit:
        inspect_vit(model)  # refuses what the lens cannot explain, with the reason
        assert isinstance(model, VisionTransformer)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    explainer = _open_explainer(entry, model, device) if onnx == "auto" else None
    return LoadedModel(
        entry=entry, model=cast(VisionTransformer, model), labels=entry.labels(), device=device, onnx=explainer
    )


def _open_explainer(entry: ModelEntry, model: nn.Module, device: torch.device) -> OnnxExplainer | None:
    """The explainer graph's session, or None (with the reason in the log) where torch must do."""
    if ONNX_EXPLAINER not in entry.manifest.artifacts:
        return None
    if not has_explainer(entry):
        log.warning(
            "%s: the ONNX explainer graph was exported from other weights; explaining with torch", entry.reference
        )
        return None
    if not onnxruntime_available():
        log.info(
            "%s: has an ONNX explainer graph but onnxruntime is not installed; explaining with torch", entry.reference
        )
        return None
    try:
        inspect_vit(model)
    except UnsupportedModelError:
        return None
    return OnnxExplainer(entry, device, threads=torch.get_num_threads())


class ModelCache:
    """Loaded models of this process, keyed by ``name@version`` (thread-safe)."""

    def __init__(self, catalog: Catalog, device: torch.device | None = None, onnx: OnnxMode = "auto"):
        self.catalog = catalog
        self.device = device
        self.onnx: OnnxMode = onnx
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    def get(self, reference: str, *, require_vit: bool = True) -> LoadedModel:
        """The loaded model; ``require_vit=False`` also serves non-ViTs (see :func:`load`)."""
        entry = self.catalog.resolve(reference)
        with self._lock:
            loaded = self._models.get(entry.reference)
            if loaded is None:
                loaded = self._models[entry.reference] = load(entry, self.device, require_vit=False, onnx=self.onnx)
        if require_vit:
            inspect_vit(loaded.network)  # the same refusal as load(), for a model cached by an analysis
        return loaded
