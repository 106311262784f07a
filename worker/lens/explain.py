"""One explain call: a single traced forward pass, every projection, ranks and maps.

The single entry point that the CLI, the API's workers, audits and the benchmark
call. All streams (``x_0..x_L``, ``a_1..a_L``, ``m_1..m_L``) at all tokens are
projected with one matrix product, then every requested target is ranked from
that one set of logits: more targets cost comparisons, not forward passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from classlens.core import requests as rules
from classlens.core.contract import (
    MAP_DECIMALS,
    BaselineMap,
    ClassScore,
    ExplainRequest,
    Explanation,
    MapKind,
    ModelRef,
    StreamStats,
    TargetExplanation,
)
from classlens.core.requests import RequestError
from worker.lens.adapter import LensModel, Trace, UnsupportedModelError, ViTSpec
from worker.lens.baselines import attention_rollout, chefer_relevance, grad_cam
from worker.lens.families import open_model
from worker.lens.gradient import gradient_relevance
from worker.lens.projection import ClassProjection, ProjectionSettings, StreamLogits
from worker.lens.ranks import class_rank, emergence_layer, identifiability
from worker.lens.vit import inspect_vit
from worker.lens.workspace import Workspace

# Computes the trace of a batch of images (``sublayers``: with ``a_b`` and ``m_b``) without
# gradients, e.g. an ONNX explainer graph (:class:`worker.onnx_explainer.OnnxExplainer`).
Tracer = Callable[[torch.Tensor, bool], Trace]


class ExplainError(ValueError):
    """A request the lens cannot honour (unknown class, layer out of range, wrong image shape).

    The request rules of :mod:`classlens.core.requests` refuse with a :class:`RequestError`; the
    lens says the same detail as its own error, so that every caller of :func:`explain` handles one.
    """


def resolve_targets(targets: Sequence[int | str], labels: Sequence[str]) -> list[int]:
    """Class indices from indices or label names, by the rule the API and the CLI follow too."""
    try:
        return rules.resolve_targets(targets, labels)
    except RequestError as error:
        raise ExplainError(error.detail) from error


def check_layers(layers: Sequence[int], depth: int) -> list[int]:
    """The layers sorted and without repeats, each in 0..depth (:func:`classlens.core.requests.check_layers`)."""
    try:
        return rules.check_layers(layers, depth)
    except RequestError as error:
        raise ExplainError(error.detail) from error


def check_images(images: torch.Tensor, lens: LensModel) -> None:
    expected = lens.input_shape
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(expected):
        raise ExplainError(
            f"images must be [batch, {expected[0]}, {expected[1]}, {expected[2]}], got {list(images.shape)}"
        )


def _rounded(values: np.ndarray) -> list[Any]:
    """Map values as nested lists, rounded to the contract's decimals; one conversion for a whole batch of maps."""
    return np.round(values.astype(np.float64), MAP_DECIMALS).tolist()


def _image_token_stats(ranks: np.ndarray, spec: ViTSpec) -> tuple[list[Any], list[Any]]:
    """Identifiability and top-1 share over the image tokens of every stream, each ``[B][K][S]``, from ``[B, K, S, T]``.

    Computed once for the whole batch; each image's, target's and stream's row is the
    same reduction as on its own (numpy reduces every row of the last axis alike).
    """
    image = ranks[..., spec.num_prefix :]
    identifiability = np.round(1.0 - image.mean(-1) / spec.num_classes, 6).tolist()
    top1_share = np.round((image == 0).mean(-1), 6).tolist()
    return identifiability, top1_share


def _stream_stats(
    prefix_ranks: list[list[int]], identifiability: list[float], top1_share: list[float], spec: ViTSpec
) -> StreamStats:
    """One stream's figures for one image and target: ``prefix_ranks`` ``[P][layers]``, the others per layer."""
    return StreamStats(
        prefix_ranks=dict(zip(spec.prefix_tokens, prefix_ranks, strict=True)),
        image_identifiability=identifiability,
        image_top1_share=top1_share,
    )


def explain(
    model: nn.Module | LensModel,
    images: torch.Tensor,
    labels: Sequence[str],
    request: ExplainRequest,
    model_ref: ModelRef,
    *,
    tracer: Tracer | None = None,
    workspace: Workspace | None = None,
) -> list[Explanation]:
    """Explain a batch of preprocessed images ``[B, C, H, W]``; one :class:`Explanation` per image.

    ``tracer`` replaces the torch forward pass (not the gradient map nor the baseline
    maps, which run the model itself): the streams may come from anywhere that reproduces
    :func:`trace`, and everything after them is the same code. ``workspace`` (one per
    loaded model: :mod:`worker.lens.workspace`) keeps the large buffers and the projection
    from one call to the next; the results are the same with it or without.
    """
    lens = open_model(model)
    spec = lens.spec
    check_images(images, lens)
    if len(labels) != spec.num_classes:
        raise ExplainError(f"{len(labels)} labels for a model with {spec.num_classes} classes")
    layers = check_layers(request.layers if request.layers is not None else [spec.depth], spec.depth)
    fixed_targets = resolve_targets(request.targets, labels) if request.targets else None
    depth, prefix = spec.depth, spec.num_prefix

    with _leased(workspace) as buffers, torch.no_grad():
        projection = _projection(lens, ProjectionSettings(norm=request.norm, bias=request.bias), buffers)
        if tracer:
            run = tracer(images, request.sublayers)
        else:
            run = lens.trace(images, sublayers=request.sublayers, workspace=buffers)
        probabilities = run.logits.softmax(-1)  # float32: every tracer returns float32 logits
        entropy = torch.special.entr(probabilities).sum(-1)  # [B], nats
        if fixed_targets is not None:
            targets = torch.tensor(fixed_targets, device=images.device).expand(len(images), -1)
        else:
            targets = run.logits.topk(min(request.top_k, spec.num_classes), dim=-1).indices
        last = run.residual[:, -1:]  # [B, 1, T, D]: the cached-scale reference
        stream_logits = projection.of_trace(run, request.sublayers, buffers, targets=targets)
        token_ranks = stream_logits.target_ranks  # [B, K, S, T]
        assert token_ranks is not None
        pooled_ranks = class_rank(projection.pooled(run.residual, last), targets)  # [B, K, L + 1]
        output_ranks = class_rank(run.logits, targets)  # [B, K]
        rows = _rows(layers)
        residual_logits = stream_logits.residual[:, rows, prefix:]  # [B, layers, N, C]
        map_values = _projection_maps(request, residual_logits, token_ranks[:, :, rows, prefix:], targets)
        token_classes = _token_classes(stream_logits, prefix, request.token_classes)
    try:
        gradient = gradient_relevance(images, targets, projection) if request.gradient_map else None
    except UnsupportedModelError as error:
        raise ExplainError(f"the gradient map is not available for this model: {error}") from error
    baselines = {name: baseline_map(lens, name, images, targets).cpu() for name in request.baseline_maps}

    # The response is built on the CPU: one copy of each tensor from the device, and one conversion
    # of each to Python values for the whole batch, not one per value.
    token_ranks_np = token_ranks.cpu().numpy()  # [B, K, S, T]
    identifiability, top1_share = _image_token_stats(token_ranks_np, spec)
    prefix_ranks = token_ranks_np[..., :prefix].swapaxes(-1, -2).tolist()  # [B][K][P][S]
    h, w = spec.grid
    batch, per_image = targets.shape
    maps = _rounded(map_values.cpu().numpy().reshape(batch, per_image, len(layers), h, w))
    gradient_maps = (
        None if gradient is None else _rounded(gradient.detach().cpu().numpy().reshape(batch, per_image, h, w))
    )
    baseline_values = {
        name: _rounded(values.numpy().reshape(batch, per_image, h, w)) for name, values in baselines.items()
    }
    logits, probability = run.logits.cpu().tolist(), probabilities.cpu().tolist()
    top = probabilities.topk(min(5, spec.num_classes)).indices.cpu().tolist()
    target_lists = targets.cpu().tolist()
    output_rank_lists = output_ranks.tolist()
    pooled_ranks_np = pooled_ranks.cpu().numpy()
    pooled_rank_lists = pooled_ranks_np.tolist()
    emergence_lists = emergence_layer(pooled_ranks_np).tolist()
    streams = {"residual": slice(0, depth + 1)}
    if request.sublayers:
        streams |= {"attention": slice(depth + 1, 2 * depth + 1), "mlp": slice(2 * depth + 1, 3 * depth + 1)}
    explanations = []
    for b in range(batch):
        prediction = [
            ClassScore(index=i, label=labels[i], probability=probability[b][i], logit=logits[b][i]) for i in top[b]
        ]
        target_results = []
        for k, target in enumerate(target_lists[b]):
            emerged = emergence_lists[b][k]
            stats = {
                name: _stream_stats(
                    [ranks[rows] for ranks in prefix_ranks[b][k]],
                    identifiability[b][k][rows],
                    top1_share[b][k][rows],
                    spec,
                )
                for name, rows in streams.items()
            }
            target_results.append(
                TargetExplanation(
                    index=target,
                    label=labels[target],
                    probability=probability[b][target],
                    logit=logits[b][target],
                    rank=output_rank_lists[b][k],
                    emergence_layer=emerged if emerged >= 0 else None,
                    pooled_ranks=pooled_rank_lists[b][k],
                    residual=stats["residual"],
                    attention=stats.get("attention"),
                    mlp=stats.get("mlp"),
                    projection_maps={str(layer): maps[b][k][i] for i, layer in enumerate(layers)},
                    gradient_map=None if gradient_maps is None else gradient_maps[b][k],
                    baseline_maps={name: values[b][k] for name, values in baseline_values.items()} or None,
                )
            )
        explanations.append(
            Explanation(
                model=model_ref,
                norm=request.norm,
                bias=request.bias,
                map_kind=request.map_kind,
                grid=spec.grid,
                patch_size=spec.patch_size,
                prefix_tokens=list(spec.prefix_tokens),
                layers=depth,
                pooling=spec.pooling,
                prediction=prediction,
                targets=target_results,
                token_classes={name: classes[b] for name, classes in token_classes.items()} or None,
                # Rounded as the maps are: a batch sums its products in another order than one image alone.
                entropy=round(float(entropy[b]), MAP_DECIMALS),
            )
        )
    return explanations


def _rows(layers: list[int]) -> slice | list[int]:
    """The layers as an index: a slice when they run without gaps, so that selecting them is a view, not a copy."""
    if layers == list(range(layers[0], layers[-1] + 1)):
        return slice(layers[0], layers[-1] + 1)
    return layers


@contextmanager
def _leased(workspace: Workspace | None) -> Iterator[Workspace | None]:
    if workspace is None:
        yield None
        return
    with workspace.lease() as buffers:
        yield buffers


def _projection(lens: LensModel, settings: ProjectionSettings, workspace: Workspace | None) -> ClassProjection:
    """The projection of ``lens`` under ``settings``, built once per workspace (``E_c`` reads frozen weights)."""

    def build() -> ClassProjection:
        try:
            return ClassProjection(lens, settings)
        except UnsupportedModelError as error:
            raise ExplainError(str(error)) from error

    if workspace is None:
        return build()
    projection: ClassProjection = workspace.built(("projection", id(lens.model), settings), build)
    return projection


def _token_classes(logits: StreamLogits, prefix: int, k: int) -> dict[str, list[list[list[int]]]]:
    """Per stream, per image: ``[layers][image tokens][k]`` class indices, best first, from the logits already computed.

    What a viewer lists when a patch is pointed at (docs/viewer.md); nothing when ``k`` is 0.
    """
    if not k:
        return {}
    streams = {"residual": logits.residual, "attention": logits.attention, "mlp": logits.mlp}
    return {
        name: part[:, :, prefix:].topk(min(k, part.shape[-1]), dim=-1).indices.cpu().tolist()
        for name, part in streams.items()
        if part is not None
    }


def baseline_map(lens: LensModel, name: BaselineMap, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One baseline method's relevance of ``targets`` ``[B, K]``: ``[B, K, N]`` (:mod:`worker.lens.baselines`).

    :class:`ExplainError` for a model the method cannot open (Grad-CAM needs a timm ``VisionTransformer``).
    """
    try:
        if name == "chefer":
            return chefer_relevance(lens, images, targets)
        if name == "rollout":
            return attention_rollout(lens, images, targets)
        inspect_vit(lens.model)
        return grad_cam(cast(VisionTransformer, lens.model), images, targets)
    except UnsupportedModelError as error:
        raise ExplainError(f"the {name} map is not available for this model: {error}") from error


def projection_map(
    model: nn.Module | LensModel,
    images: torch.Tensor,
    targets: torch.Tensor,
    projection: ClassProjection,
    layer: int,
    map_kind: MapKind = "logit",
) -> torch.Tensor:
    """The projection relevance map of ``targets`` ``[B, K]`` at one layer, flat: ``[B, K, N]``.

    For callers that need only the map (faithfulness evaluation, audits): one
    forward pass without sublayers, one projection of one layer.
    """
    spec = projection.spec
    check_layers([layer], spec.depth)
    with torch.no_grad():
        run = projection.lens.trace(images, sublayers=False)
        tokens = run.residual[:, layer : layer + 1]  # [B, 1, T, D]
        logits = projection(tokens, run.residual[:, -1:])[:, :, spec.num_prefix :]  # [B, 1, N, C]
        ranks = class_rank(logits, targets)  # [B, K, 1, N]
        request = ExplainRequest(map_kind=map_kind)
        return _projection_maps(request, logits, ranks, targets)[:, :, 0]


def _projection_maps(
    request: ExplainRequest, logits: torch.Tensor, ranks: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Per image, target and requested layer, the value of the target at each image token: ``[B, K, layers, N]``.

    ``logits``: ``[B, layers, N, C]``; ``ranks``: ``[B, K, layers, N]``.
    """
    if request.map_kind == "identifiability":
        return identifiability(ranks, logits.shape[-1])
    values = logits.softmax(-1) if request.map_kind == "probability" else logits
    index = targets[:, None, None, :].expand(-1, values.shape[1], values.shape[2], -1)
    return values.gather(-1, index).permute(0, 3, 1, 2)
