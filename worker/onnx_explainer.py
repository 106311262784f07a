"""Run a model's ONNX explainer graph with onnxruntime, as a drop-in for the lens's torch trace.

The graph (:mod:`worker.onnx_export`) returns the logits, the residual stream and
every stream's projection products, so :class:`OnnxExplainer` hands back a
:class:`~worker.lens.vit.Trace` with ``centred`` and ``scales`` filled in, and
the lens finishes the projection, ranks and maps on it as it would on torch's. Only
passes without gradients can use it: the gradient map needs autograd and stays on torch.

The graph is an artifact like the weights: its bytes are checked against the
manifest's size and sha256 as they are read, and onnxruntime only ever sees
those checked bytes (a tampered file is refused before it is parsed).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import numpy as np
import torch

from model_store.artifacts import ArtifactError
from model_store.catalog import ModelEntry
from model_store.manifest import ONNX_EXPLAINER
from worker.lens.projection import CentredStreams
from worker.lens.vit import Trace
from worker.onnx_export import GRAPH_LAYOUT, INPUT_NAME, OUTPUT_NAMES

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def onnxruntime_available() -> bool:
    """Whether ``onnxruntime`` (the ``onnx`` or ``onnx-gpu`` extra) is installed, without importing it."""
    return importlib.util.find_spec("onnxruntime") is not None


def has_explainer(entry: ModelEntry) -> bool:
    """Whether the manifest records an explainer graph exported from the weights it has now."""
    artifact = entry.manifest.artifacts.get(ONNX_EXPLAINER)
    if artifact is None or artifact.details.get("weights_sha256") != entry.manifest.weights.sha256:
        return False
    if artifact.details.get("layout") != GRAPH_LAYOUT:
        log.warning(
            "%s: explainer graph of an older layout; re-export it (classlens models export-onnx)", entry.reference
        )
        return False
    return True


def choose_providers(device: torch.device) -> tuple[list[str], str]:
    """onnxruntime's execution providers for a model on ``device``, and why, for the log.

    CUDA only when onnxruntime was built with it (``onnxruntime-gpu``) *and* the
    model lives on a CUDA device; CPU otherwise.
    """
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if device.type == "cuda":
        if CUDA in available and torch.cuda.is_available():
            return [CUDA, CPU], "the model is on CUDA and onnxruntime has the CUDA provider"
        return [CPU], (
            "the model is on CUDA but this onnxruntime has no CUDA provider (install the onnx-gpu extra); "
            "falling back to CPU"
        )
    return [CPU], f"the model is on {device.type}"


def open_session(graph: bytes, name: str, device: torch.device, threads: int | None = None) -> Any:
    """An onnxruntime ``InferenceSession`` over ``graph``, on CUDA where :func:`choose_providers` allows."""
    import onnxruntime

    providers, why = choose_providers(device)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: onnxruntime warns about every unused initializer
    # No busy-waiting between runs: onnxruntime's threads otherwise spin on the cores that torch
    # (the gradient map, the projection) needs next; measured, torch's forward ran 7x slower beside them.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(graph, sess_options=options, providers=providers)
    running = session.get_providers()[0]
    if running != providers[0]:
        log.warning(
            "%s: onnxruntime could not start %s (%s); running the graph on %s", name, providers[0], why, running
        )
    else:
        log.info("%s: graph on onnxruntime %s (%s)", name, running, why)
    return session


class OnnxExplainer:
    """An onnxruntime session over a verified explainer graph, producing lens traces."""

    def __init__(self, entry: ModelEntry, device: torch.device | None = None, threads: int | None = None):
        artifact = entry.manifest.artifacts.get(ONNX_EXPLAINER)
        if artifact is None:
            raise ArtifactError(f"{entry.reference} has no {ONNX_EXPLAINER!r} artifact")
        outputs = artifact.details.get("outputs")
        if outputs is not None and list(outputs) != list(OUTPUT_NAMES):
            raise ArtifactError(f"{entry.reference}: explainer outputs {outputs}, expected {list(OUTPUT_NAMES)}")
        graph = entry.artifact_bytes(ONNX_EXPLAINER)  # checked before onnxruntime parses a byte
        self.entry: ModelEntry | None = entry
        self._open(graph, entry.reference, device, threads)

    @classmethod
    def unregistered(
        cls, graph: bytes, name: str, device: torch.device | None = None, threads: int | None = None
    ) -> OnnxExplainer:
        """A session over a graph that is in no catalog (the benchmark's freshly exported ones): no checksum."""
        explainer = cls.__new__(cls)
        explainer.entry = None
        explainer._open(graph, name, device, threads)
        return explainer

    def _open(self, graph: bytes, name: str, device: torch.device | None, threads: int | None) -> None:
        self.device = device or torch.device("cpu")
        self.session = open_session(graph, name, self.device, threads)
        self.providers = list(self.session.get_providers())

    @property
    def provider(self) -> str:
        """The provider that runs the graph (the first one onnxruntime accepted)."""
        return self.providers[0]

    def trace(self, images: torch.Tensor, sublayers: bool = True) -> Trace:
        """The lens's trace of ``images`` ``[B, C, H, W]``, computed by the graph; tensors on ``self.device``.

        The graph always projects the sublayers (they are the residual's summands);
        :meth:`~worker.lens.projection.ClassProjection.of_trace` drops them when
        ``sublayers`` is false, so the argument is only here to match the torch tracer.
        """
        batch = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        outputs = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})
        logits, residual, centred_residual, attention, mlp, scales = (
            torch.from_numpy(np.asarray(output)).to(self.device) for output in outputs
        )
        centred = CentredStreams(centred_residual, attention, mlp)
        return Trace(logits, residual, None, None, None, centred=centred, scales=scales)
