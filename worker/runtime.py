"""A registered model ready to explain: loaded once per process, on the process's device.

The cache is per process and filled lazily, so a Celery worker loads a model
after it has forked and never shares CUDA state with its parent. The CLI, the
workers and the benchmark all explain through :meth:`LoadedViT.explain`.

Half precision (``settings.precision``) is for the forward pass on CUDA only: a
copy of the model in float16 or bfloat16 computes the trace, and everything read
from the float32 model (the head weights of the projection, the gradient map)
stays float32. The tolerance it costs is measured in ``tests/test_gpu_path.py``
and stated in docs/gpu.md.
"""

from __future__ import annotations

import copy
import functools
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, overload

import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from classlens.core.contract import ExplainRequest, Explanation, ModelRef
from classlens.core.images import fit_to_input
from model_store.catalog import Catalog, ModelChangedError, ModelEntry
from model_store.manifest import ONNX_EXPLAINER
from worker.devices import DeviceSetting, resolve_device
from worker.lens.adapter import LensModel, Trace, UnsupportedModelError, ViTSpec
from worker.lens.explain import Tracer, explain
from worker.lens.families import open_model
from worker.lens.vit import inspect_vit
from worker.lens.workspace import Workspace
from worker.model_loader import load_model
from worker.onnx_explainer import OnnxExplainer, has_explainer, onnxruntime_available
from worker.preprocess import preprocess

log = logging.getLogger(__name__)

# "auto": explain through the manifest's ONNX explainer graph when there is one and onnxruntime
# is installed; "off": always torch (settings.onnx, CLASSLENS_ONNX).
OnnxMode = Literal["auto", "off"]

# The dtype of the forward pass (settings.precision, CLASSLENS_PRECISION).
Precision = Literal["float32", "float16", "bfloat16"]
HALF_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def default_device() -> torch.device:
    """CUDA when present, else CPU. Call only after fork (it initialises CUDA)."""
    return resolve_device("auto")


def forward_dtype(precision: Precision, device: torch.device, *, half_on_cpu: bool = False) -> torch.dtype | None:
    """The dtype of the half-precision forward pass, or None for float32.

    On CPU, half precision is ignored (logged once per process): CPU kernels for float16
    and bfloat16 matrix products are slower than float32's, not faster, so it would cost
    accuracy for nothing. ``half_on_cpu`` runs it anyway, to measure its tolerance.
    """
    if precision == "float32":
        return None
    if device.type != "cuda" and not half_on_cpu:
        _log_ignored_precision(precision, device.type)
        return None
    return HALF_DTYPES[precision]


@functools.cache
def _log_ignored_precision(precision: str, device: str) -> None:
    """Log once per process, not once per model loaded."""
    log.info(
        "precision %s ignored on %s: half-precision matrix products are slower there than float32; "
        "forward passes stay float32",
        precision,
        device,
    )


def half_tracer(model: nn.Module, dtype: torch.dtype) -> Tracer:
    """A tracer for :func:`~worker.lens.explain.explain` whose forward pass runs a ``dtype`` copy of ``model``.

    The copy holds the weights a second time (at half the size); ``model`` itself stays
    float32, since the projection reads its head weights and the gradient map runs on it.
    The trace comes back in float32, so the projection, ranks and maps are computed in
    float32 from half-precision streams: the tolerance is what the forward pass rounds.
    """
    half = open_model(copy.deepcopy(model).to(dtype))

    def run(images: torch.Tensor, sublayers: bool) -> Trace:
        found = half.trace(images.to(dtype), sublayers=sublayers)
        return Trace(
            logits=found.logits.float(),
            residual=found.residual.float(),
            attention=None if found.attention is None else found.attention.float(),
            mlp=None if found.mlp is None else found.mlp.float(),
            attention_probs=None,
        )

    return run


@dataclass
class LoadedModel:
    """A loaded registered model, whatever it is: a ViT, or a CNN loaded for the representation analyses.

    What every model has (weights, labels, preprocessing). Explaining needs a model the lens
    opens: :class:`LoadedViT`, which :func:`load` returns for one.
    """

    entry: ModelEntry
    network: nn.Module
    labels: list[str]
    device: torch.device

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


@dataclass
class LoadedViT(LoadedModel):
    """A loaded model that the lens opens (``lens``, its family's adapter): one that can be explained."""

    lens: LensModel
    # The ONNX explainer graph, for explain requests that need no gradients (see :func:`load`).
    onnx: OnnxExplainer | None = None
    # The half-precision forward pass (CUDA with settings.precision other than float32; see half_tracer).
    half: Tracer | None = None
    # The buffers and projections its explain calls reuse (bounded: worker.lens.workspace; counted by
    # ModelCache beside the weights, as it grows).
    workspace: Workspace = field(default_factory=Workspace)

    @property
    def spec(self) -> ViTSpec:
        """The shape the lens reads."""
        return self.lens.spec

    @property
    def timm_vit(self) -> VisionTransformer:
        """The model as a timm ViT, for what only opens those (ONNX export, baselines, faithfulness);
        :class:`UnsupportedModelError` naming the reason for a ViT of another family."""
        inspect_vit(self.network)
        assert isinstance(self.network, VisionTransformer)
        return self.network

    def explain(self, images: Sequence[Image.Image], request: ExplainRequest) -> list[Explanation]:
        """Explain through the ONNX graph when loaded and the request needs no gradients, else torch.

        The streams are the only thing the graph (float32) or the half-precision forward
        replaces; the results are those of torch within the graph's verified tolerance or
        half precision's measured one (docs/gpu.md). The graph comes first: it was chosen
        for the model, and ``CLASSLENS_ONNX=off`` leaves every request to the half forward.
        """
        tracer = self.onnx.trace if self.onnx is not None and not request.needs_gradients else self.half
        return explain(
            self.lens, self.preprocess(images), self.labels, request, self.ref, tracer=tracer, workspace=self.workspace
        )


@overload
def load(
    entry: ModelEntry,
    device: torch.device | None = None,
    *,
    require_vit: Literal[True] = True,
    onnx: OnnxMode = "auto",
    precision: Precision = "float32",
    half_on_cpu: bool = False,
) -> LoadedViT: ...


@overload
def load(
    entry: ModelEntry,
    device: torch.device | None = None,
    *,
    require_vit: bool,
    onnx: OnnxMode = "auto",
    precision: Precision = "float32",
    half_on_cpu: bool = False,
) -> LoadedModel: ...


def load(
    entry: ModelEntry,
    device: torch.device | None = None,
    *,
    require_vit: bool = True,
    onnx: OnnxMode = "auto",
    precision: Precision = "float32",
    half_on_cpu: bool = False,
) -> LoadedModel:
    """Load and check a catalog entry (verified weights, a supported ViT): a :class:`LoadedViT`.

    ``require_vit=False`` accepts any registered timm model (a CNN, say) for the representation
    analyses, which check what each of them needs (:mod:`worker.analyses.run`): a model the
    lens cannot open comes back as a plain :class:`LoadedModel`.
    ``onnx="auto"`` also opens the manifest's ONNX explainer graph when onnxruntime is
    installed; like the weights, a graph whose checksum differs is refused (``ArtifactError``).
    ``precision`` other than float32 adds a half-precision forward pass for a ViT on CUDA
    (:func:`forward_dtype`; ``half_on_cpu`` measures it on CPU); the graph stays float32.
    """
    device = device or default_device()
    model = load_model(entry, device)
    lens = _lens_of(model)
    if require_vit and lens is None:
        open_model(model)  # refuses what the lens cannot explain, with the reason
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if lens is None:
        return LoadedModel(entry=entry, network=model, labels=entry.labels(), device=device)
    explainer = _open_explainer(entry, model, device) if onnx == "auto" else None
    dtype = forward_dtype(precision, device, half_on_cpu=half_on_cpu)
    half = half_tracer(model, dtype) if dtype is not None else None
    return LoadedViT(
        entry=entry, network=model, labels=entry.labels(), device=device, lens=lens, onnx=explainer, half=half
    )


def _lens_of(model: nn.Module) -> LensModel | None:
    """The family adapter, or None where the lens cannot open ``model`` (a CNN loaded for an analysis)."""
    try:
        return open_model(model)
    except UnsupportedModelError:
        return None


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
    return OnnxExplainer(entry, device, threads=torch.get_num_threads())


class ModelCache:
    """Loaded models of this process, keyed by ``name@version`` (thread-safe), bounded in number and bytes.

    ``device`` may be a setting (``"auto"``, ``"cpu"``, ``"cuda"``): it is resolved when the
    first model loads, not when the cache is built, so building one touches no CUDA.

    At most ``max_models`` models and ``max_bytes`` bytes are kept: their parameters and buffers (a
    half-precision copy counted too) and the workspace each ViT's explanations keep, at its size when
    room is made. The least recently used goes first, and every eviction is logged with the model, its
    size and why. Room is made before a model loads (estimated from its weights file) and checked again
    with its real size after, so that the old models and the new one are not all held at once. A model
    larger than ``max_bytes`` on its own is still served, alone. A model whose catalog entry changed
    (registered again with ``--overwrite``, an ONNX graph added) is
    loaded again, and one that was disabled or removed is dropped.
    """

    def __init__(
        self,
        catalog: Catalog,
        device: torch.device | DeviceSetting | None = None,
        onnx: OnnxMode = "auto",
        precision: Precision = "float32",
        *,
        max_models: int = 4,
        max_bytes: int = 2 * 1024**3,
    ):
        self.catalog = catalog
        self._device = device
        self.onnx: OnnxMode = onnx
        self.precision: Precision = precision
        self.max_models = max_models
        self.max_bytes = max_bytes
        # Least recently used first: a hit moves its model to the end.
        self._models: dict[str, LoadedModel] = {}
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        """The device models load on (resolving the setting the first time: call after fork)."""
        if not isinstance(self._device, torch.device):
            self._device = resolve_device(self._device or "auto")
        return self._device

    @property
    def references(self) -> list[str]:
        """The loaded models, least recently used first."""
        with self._lock:
            return list(self._models)

    @property
    def bytes_held(self) -> int:
        with self._lock:
            return self._held()

    def _held(self) -> int:
        """The models' weights (as loaded) and the buffers their explanations keep (as they are now)."""
        kept = sum(model.workspace.bytes_held for model in self._models.values() if isinstance(model, LoadedViT))
        return sum(self._sizes.values()) + kept

    @staticmethod
    def footprint(loaded: LoadedModel) -> int:
        """Bytes of the model's parameters and buffers, plus its half-precision copy when it has one."""
        tensors = [*loaded.network.parameters(), *loaded.network.buffers()]
        size = sum(tensor.numel() * tensor.element_size() for tensor in tensors)
        # The half-precision copy: floating tensors at 2 bytes each, the others as they are.
        if isinstance(loaded, LoadedViT) and loaded.half is not None:
            size += sum(
                tensor.numel() * (2 if tensor.is_floating_point() else tensor.element_size()) for tensor in tensors
            )
        return size

    @overload
    def get(
        self, reference: str, *, require_vit: Literal[True] = True, fingerprint: str | None = None
    ) -> LoadedViT: ...

    @overload
    def get(self, reference: str, *, require_vit: bool, fingerprint: str | None = None) -> LoadedModel: ...

    def get(self, reference: str, *, require_vit: bool = True, fingerprint: str | None = None) -> LoadedModel:
        """The loaded model, a :class:`LoadedViT`; ``require_vit=False`` also serves non-ViTs (see :func:`load`).

        ``fingerprint`` is the entry's result fingerprint the job was keyed with: when the catalog says
        otherwise it looks again (this process' view may be a moment old), and raises
        :class:`~model_store.catalog.ModelChangedError` if the version really changed.
        """
        entry = self.catalog.resolve(reference)
        if fingerprint is not None and entry.result_fingerprint != fingerprint:
            self.catalog.refresh()
            entry = self.catalog.resolve(reference)
            if entry.result_fingerprint != fingerprint:
                raise ModelChangedError(
                    f"{entry.reference} was registered again (other weights, labels or preprocessing) after this "
                    "job was submitted; submit it again to explain it with the model as it is now"
                )
        with self._lock:
            self._prune()
            loaded = self._models.get(entry.reference)
            # The manifest alone may not tell (labels corrected, the manifest written again unchanged).
            changed = loaded is not None and (
                loaded.entry != entry or loaded.entry.result_fingerprint != entry.result_fingerprint
            )
            if changed:
                self._evict(entry.reference, "its catalog entry changed (registered again); loading it anew")
                loaded = None
            if loaded is None:
                self._make_room(entry.manifest.weights.size, entry.reference)
                loaded = load(entry, self.device, require_vit=False, onnx=self.onnx, precision=self.precision)
                size = self.footprint(loaded)
                self._make_room(size, entry.reference)
                if size > self.max_bytes:
                    log.warning(
                        "%s alone holds %.1f MiB, more than the cache's %.1f MiB (model_cache_max_bytes): "
                        "it is kept, and no other model with it",
                        entry.reference,
                        size / 2**20,
                        self.max_bytes / 2**20,
                    )
                self._sizes[entry.reference] = size
            else:
                del self._models[entry.reference]  # re-inserted below: now the most recently used
            self._models[entry.reference] = loaded
        if require_vit and not isinstance(loaded, LoadedViT):
            open_model(loaded.network)  # the same refusal as load(), for a model cached by an analysis
        return loaded

    def _prune(self) -> None:
        """Drop models the catalog no longer serves (disabled, or removed from the store)."""
        served = self.catalog.entries
        for reference in list(self._models):
            name, _, version = reference.partition("@")
            if (name, version) not in served:
                why = "disabled" if self.catalog.is_disabled(reference) else "no longer in the catalog"
                self._evict(reference, why)

    def _make_room(self, incoming: int, reference: str) -> None:
        """Evict the least recently used models until ``reference`` (``incoming`` bytes, not yet held) fits."""
        while self._models:
            held = self._held()
            if len(self._models) < self.max_models and held + incoming <= self.max_bytes:
                return
            if len(self._models) >= self.max_models:
                why = f"to make room for {reference} (model_cache_max_models={self.max_models})"
            else:
                why = (
                    f"to make room for {reference} ({incoming / 2**20:.1f} MiB more than the "
                    f"{self.max_bytes / 2**20:.1f} MiB of model_cache_max_bytes allow)"
                )
            self._evict(next(iter(self._models)), why)

    def _evict(self, reference: str, why: str) -> None:
        self._models.pop(reference, None)
        size = self._sizes.pop(reference, 0)
        log.info(
            "evicted %s (%.1f MiB of parameters and buffers) from the model cache: %s", reference, size / 2**20, why
        )
        if isinstance(self._device, torch.device) and self._device.type == "cuda":
            torch.cuda.empty_cache()  # give the freed blocks back (a job still holding the model keeps it alive)
