"""Export a timm ViT as an *explainer graph*: one ONNX graph that runs the model and projects every stream.

The graph returns the logits, the residual stream and, for every token of every
stream (``x_0 .. x_L, a_1 .. a_L, m_1 .. m_L``), the settings-free half of the
projection: ``E_c v`` and ``s(v)`` (:meth:`worker.lens.projection.ClassProjection.centred`).
Putting the class-embedding products inside the graph lets onnxruntime run them
with the rest of the pass (measured on vit_base, batch 1: explain went from 1.65x
to 1.39x onnxruntime's own forward pass, against returning the streams and
projecting them in torch); the request's settings (fresh or cached scale, head bias), the ranks and the maps
stay in torch, in :meth:`ClassProjection.finish` and the lens, one
implementation for both engines.

Hooks cannot be exported, so :class:`ExplainerGraph` re-runs the model block by
block with the timm ``Block`` identity ``x' = x + ls1(attn(norm1(x)))``,
``x_b = x' + ls2(mlp(norm2(x')))``, or the ``ResPostBlock`` one ``x' = x + norm1(attn(x))``,
``x_b = x' + norm2(mlp(x'))`` (``drop_path`` is the identity in eval mode;
:func:`worker.lens.vit.block_sublayers`). :func:`inspect_vit` has checked that every
block is one of those, so the identity holds; :func:`verify_explainer` checks it again on
real inputs before a graph is trusted.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from model_store.artifacts import describe_file
from model_store.catalog import BUNDLED_SAMPLES, ModelEntry, record_artifact
from model_store.manifest import ONNX_EXPLAINER
from worker.lens.projection import CentredStreams, ClassProjection, centred_stream_logits, stream_scales
from worker.lens.vit import Trace, block_sublayers, blocks_of, inspect_vit, trace

log = logging.getLogger(__name__)

EXPLAINER_FILE = "explainer.onnx"
SAMPLES = BUNDLED_SAMPLES
INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "residual", "centred_residual", "centred_attention", "centred_mlp", "scales")
# Version of what the outputs mean; a graph recorded with another layout is not used (re-export it).
GRAPH_LAYOUT = 3
DEFAULT_OPSET = 18
# Agreement asked of an exported graph, per output: |onnx - torch| <= ATOL + RTOL * max |torch|.
# onnxruntime on CPU reproduces torch within ~1e-6; these leave room for other kernels, not for bugs.
ATOL = 1e-4
RTOL = 1e-4


class ExportError(RuntimeError):
    """The model cannot be exported, or the exported graph disagrees with torch."""


class ExplainerGraph(nn.Module):
    """The ViT's forward pass returning :data:`OUTPUT_NAMES` instead of the logits alone.

    Same parameters as the wrapped model (nothing is copied), so it exports the
    model's weights as they are; ``E_c`` is added as one constant.
    """

    def __init__(self, model: VisionTransformer):
        super().__init__()
        inspect_vit(model)  # refuses models whose blocks do not follow the identity below
        projection = ClassProjection(model)
        if not isinstance(projection.final_norm, nn.LayerNorm):
            raise ExportError("only a LayerNorm before the head has the closed form that the graph computes")
        self.model = model
        self.eps = projection.eps
        self.centred_embedding: torch.Tensor
        self.register_buffer("centred_embedding", projection.centred_embedding.detach().clone())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model = self.model
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        residual, attention, mlp = [x], [], []
        for block in blocks_of(model):
            a, m = block_sublayers(block, x)
            x = x + a + m
            residual.append(x)
            attention.append(a)
            mlp.append(m)
        logits = model.forward_head(model.norm(x))
        streams = torch.stack(residual, dim=1), torch.stack(attention, dim=1), torch.stack(mlp, dim=1)
        centred = centred_stream_logits(*streams, self.centred_embedding)
        assert centred.attention is not None
        assert centred.mlp is not None
        return logits, streams[0], centred.residual, centred.attention, centred.mlp, stream_scales(*streams, self.eps)


def export_explainer(model: VisionTransformer, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """Write the explainer graph of ``model`` (on CPU, eval mode) to ``path``, with a dynamic batch size.

    The file is self-contained (no external data), so that one sha256 covers it.
    """
    _export(ExplainerGraph(model).eval(), model, path, list(OUTPUT_NAMES), opset)


def export_plain(model: VisionTransformer, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """The model itself (logits only), exported as the explainer graph is: onnxruntime's plain forward pass."""
    _export(model, model, path, [OUTPUT_NAMES[0]], opset)


def _export(module: nn.Module, model: VisionTransformer, path: Path, outputs: list[str], opset: int) -> None:
    if model.training:
        raise ExportError("export a model in eval mode (dropout and drop-path would be baked into the graph)")
    channels = model.patch_embed.proj.in_channels
    height, width = model.patch_embed.img_size
    example = torch.zeros(2, channels, height, width)  # batch 2: a batch of 1 may be specialised away
    with warnings.catch_warnings():
        # The exporter is chatty about things that do not concern a ViT (e.g. its own deprecations).
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module,
                (example,),
                str(path),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=outputs,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                external_data=False,
                verbose=False,
            )
        except Exception as error:  # the exporter raises many types; all mean "no graph"
            raise ExportError(f"cannot export {type(model).__name__} to ONNX: {error}") from error


@dataclass(frozen=True)
class Agreement:
    """How closely an exported graph reproduces torch on some inputs."""

    max_abs_diff: dict[str, float]  # per output
    tolerance: dict[str, float]  # per output
    top_k: int
    same_top_k: bool
    images: int

    @property
    def ok(self) -> bool:
        return self.same_top_k and all(self.max_abs_diff[n] <= self.tolerance[n] for n in self.max_abs_diff)

    def describe(self) -> str:
        diffs = ", ".join(f"{n} {self.max_abs_diff[n]:.2e} (<= {self.tolerance[n]:.2e})" for n in self.max_abs_diff)
        return f"{self.images} images, top-{self.top_k} {'identical' if self.same_top_k else 'DIFFERENT'}; {diffs}"


def graph_outputs(run: Trace) -> dict[str, torch.Tensor | None]:
    """A trace's tensors under the graph's output names."""
    centred = run.centred
    return {
        "logits": run.logits,
        "residual": run.residual,
        "centred_residual": None if centred is None else centred.residual,
        "centred_attention": None if centred is None else centred.attention,
        "centred_mlp": None if centred is None else centred.mlp,
        "scales": run.scales,
    }


def compare_traces(reference: Trace, candidate: Trace, top_k: int = 3) -> Agreement:
    """Every graph output of ``candidate`` against the torch ``reference``, and the top-k classes of each image."""
    diffs, tolerances = {}, {}
    wanted, found = graph_outputs(reference), graph_outputs(candidate)
    for name in OUTPUT_NAMES:
        want, got = wanted[name], found[name]
        if want is None or got is None or want.shape != got.shape:
            raise ExportError(f"output {name!r}: shape {_shape(got)}, torch has {_shape(want)}")
        want, got = want.detach().float().cpu(), got.detach().float().cpu()
        diffs[name] = float((want - got).abs().max())
        tolerances[name] = ATOL + RTOL * float(want.abs().max())
    k = min(top_k, reference.logits.shape[-1])
    same = bool(torch.equal(reference.logits.topk(k).indices.cpu(), candidate.logits.topk(k).indices.cpu()))
    return Agreement(diffs, tolerances, k, same, int(reference.logits.shape[0]))


def torch_reference(model: VisionTransformer, images: torch.Tensor) -> Trace:
    """What the graph should return for ``images``, computed by the lens's own torch code."""
    with torch.no_grad():
        run = trace(model, images.cpu(), sublayers=True)
        assert run.attention is not None
        assert run.mlp is not None
        projection = ClassProjection(model)
        centred, scales = projection.centred(run.residual, run.attention, run.mlp)
    return dataclasses.replace(run, centred=CentredStreams.split(centred, projection.spec.depth), scales=scales)


def verify_explainer(model: VisionTransformer, path: Path, images: torch.Tensor, top_k: int = 3) -> Agreement:
    """Run the graph at ``path`` with onnxruntime (CPU) and the lens's own torch code on ``images``; compare."""
    from worker.onnx_explainer import OnnxExplainer

    explainer = OnnxExplainer.unregistered(path.read_bytes(), path.name, threads=torch.get_num_threads())
    return compare_traces(torch_reference(model, images), explainer.trace(images), top_k)


def graph_details(opset: int, agreement: Agreement, weights_sha256: str) -> dict[str, Any]:
    """What the manifest records beside the graph's checksum.

    ``weights_sha256`` ties the graph to the weights it was exported from: a graph
    left behind after the weights changed is not used.
    """
    return {
        "opset": opset,
        "input": INPUT_NAME,
        "outputs": list(OUTPUT_NAMES),
        "layout": GRAPH_LAYOUT,
        "weights_sha256": weights_sha256,
        "exporter": f"torch.onnx (dynamo) {torch.__version__}",
        "verified_on": agreement.images,
        "max_abs_diff": {name: float(f"{value:.3g}") for name, value in agreement.max_abs_diff.items()},
    }


def _shape(tensor: torch.Tensor | None) -> str:
    return "none" if tensor is None else str(list(tensor.shape))


def sample_images(entry: ModelEntry, count: int = 8, seed: int = 0) -> torch.Tensor:
    """Preprocessed inputs to verify a graph on: the bundled Fashion-MNIST samples for 28x28 grey
    models (real activations, real near-ties), seeded Gaussian noise of the input's shape otherwise."""
    spec = entry.manifest.input
    samples = sorted(SAMPLES.glob("*.png"))
    if (spec.height, spec.width, spec.colour_mode) == (28, 28, "L") and samples:
        from PIL import Image

        from worker.preprocess import preprocess

        images = []
        for path in samples:
            with Image.open(path) as image:
                images.append(preprocess(image, spec, entry.manifest.preprocessing))
        return torch.stack(images)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, spec.channels, spec.height, spec.width, generator=generator)


def export_entry(entry: ModelEntry, opset: int = DEFAULT_OPSET) -> tuple[ModelEntry, Agreement]:
    """Export a registered ViT's explainer graph into its folder, verify it, record it in the manifest.

    The graph is written under a temporary name and verified against torch on
    :func:`sample_images`; only a graph that agrees is renamed to
    ``explainer.onnx`` and recorded (role ``onnx_explainer``, with its sha256, size,
    opset and outputs). A graph that disagrees raises :class:`ExportError` and
    leaves the folder and manifest as they were.
    """
    from worker.runtime import load

    loaded = load(entry, torch.device("cpu"), onnx="off")  # verified weights; refuses non-ViTs
    handle, name = tempfile.mkstemp(prefix=f".{EXPLAINER_FILE}.", dir=entry.folder)
    os.close(handle)
    staged = Path(name)
    try:
        export_explainer(loaded.timm_vit, staged, opset)
        agreement = verify_explainer(loaded.timm_vit, staged, sample_images(entry))
        if not agreement.ok:
            raise ExportError(f"{entry.reference}: the ONNX graph disagrees with torch: {agreement.describe()}")
        details = graph_details(opset, agreement, entry.manifest.weights.sha256)
        artifact = describe_file(staged, "onnx", **details).model_copy(update={"file": EXPLAINER_FILE})
        os.replace(staged, entry.folder / EXPLAINER_FILE)
    finally:
        staged.unlink(missing_ok=True)
    log.info("%s: explainer graph verified: %s", entry.reference, agreement.describe())
    return record_artifact(entry, ONNX_EXPLAINER, artifact), agreement
