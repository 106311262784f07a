"""One entry point for every analysis: what the CLI (``classlens analyze``) and the worker task call.

The methods are those of METHODS.md section 2 (CKA, attention distance, skip ratios,
token-localisation CKA, probes, model comparison) and section 1 (key-value memories,
attention and context perturbation); each lives in its own module of this package, and
this one only checks the request, feeds the modules the images in batches of
``request.batch_size`` (preprocessed for each model as its manifest says; a last batch
under 4 images joins the one before), reports progress, turns tensors into JSON-ready
numbers and draws the figures. docs/analyses.md gives the layout of ``data`` per kind and
the figure names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import numpy as np
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from classlens.core.capabilities import analysis_needs
from classlens.core.contract import AnalysisRequest
from worker.analyses import figures
from worker.analyses.attention_distance import PrefixConvention, mean_attention_distance
from worker.analyses.cka import CKAError
from worker.analyses.layer_cka import CKAMatrix, cka_across, cka_within, localisation_cka
from worker.analyses.layer_probes import SPLIT_RULE, layer_probes, probe_positions
from worker.analyses.memories import (
    AGREEMENT_K,
    MemoryLayoutError,
    attention_value_scores,
    class_directions,
    key_value_agreement,
    memory_scores,
    memory_statistics,
    top_memories,
)
from worker.analyses.perturbation import default_region, perturbation_effects, region_keep
from worker.analyses.report import Section, Table, html_report
from worker.analyses.representations import LayerSpec, RepresentationError, check_representation, describe
from worker.analyses.residual import categorical_updates, residual_composition, stream_logits
from worker.analyses.skip_ratio import cnn_skip_ratios, residual_blocks, skip_ratios
from worker.lens.projection import ClassProjection
from worker.lens.vit import UnsupportedModelError, ViTSpec, inspect_vit
from worker.model_loader import ModelLoadError, create_architecture
from worker.runtime import LoadedModel

Progress = Callable[[int, int], None]  # (done, total), called as the work advances

MIN_IMAGES = 4
DECIMALS = 6
RANDOM_SEED = 0  # the random-initialised copy of the memories comparison


class AnalysisError(ValueError):
    """A request the analysis cannot honour (e.g. probes without labels, a CNN for attention distance)."""


@dataclass
class AnalysisOutcome:
    data: dict[str, Any]  # JSON-able numbers behind the figures (AnalysisResult.data)
    figures: dict[str, bytes] = field(default_factory=dict)  # name -> PNG bytes ("report" -> HTML bytes)


def run_analysis(
    request: AnalysisRequest,
    models: Sequence[LoadedModel],
    images: Sequence[Image.Image],
    labels: np.ndarray | None,
    progress: Progress = lambda done, total: None,
) -> AnalysisOutcome:
    """Run ``request`` on ``models`` (one, or two for cka-across / compare) over ``images``."""
    job = _Job(request, list(models), list(images), _labels(labels, len(images)), _Steps(progress))
    try:
        _check(job)
        return _RUNNERS[request.kind](job)
    except (CKAError, RepresentationError, UnsupportedModelError, MemoryLayoutError, ModelLoadError) as error:
        raise AnalysisError(str(error)) from error


# --- the request, checked -------------------------------------------------------------------------


class _Steps:
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


_T = TypeVar("_T")


@dataclass
class _Job:
    request: AnalysisRequest
    models: list[LoadedModel]
    images: list[Image.Image]
    labels: torch.Tensor | None
    steps: _Steps

    @property
    def spans(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of every batch; a last batch under 4 images joins the one before."""
        size, count = self.request.batch_size, len(self.images)
        spans = [(start, min(start + size, count)) for start in range(0, count, size)]
        if len(spans) > 1 and spans[-1][1] - spans[-1][0] < MIN_IMAGES:
            spans[-2:] = [(spans[-2][0], count)]
        return spans

    def batches(self, loaded: LoadedModel) -> Iterator[torch.Tensor]:
        for start, stop in self.spans:
            yield loaded.preprocess(self.images[start:stop])

    def labelled(self, loaded: LoadedModel) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        for (start, stop), batch in zip(self.spans, self.batches(loaded), strict=True):
            yield batch, None if self.labels is None else self.labels[start:stop].to(loaded.device)


def _labels(labels: np.ndarray | None, count: int) -> torch.Tensor | None:
    if labels is None:
        return None
    values = np.asarray(labels)
    if values.shape != (count,):
        raise AnalysisError(f"{values.size} labels for {count} images: give one class index per image")
    if not np.issubdtype(values.dtype, np.integer):
        raise AnalysisError(f"labels must be class indices (integers), got {values.dtype}")
    return torch.from_numpy(values.astype(np.int64))


def _name(loaded: LoadedModel) -> str:
    return loaded.entry.reference


def _vit(loaded: LoadedModel, kind: str) -> tuple[VisionTransformer, ViTSpec]:
    network = loaded.network
    try:
        spec = inspect_vit(network)
    except UnsupportedModelError as error:
        raise AnalysisError(f"{kind} needs a Vision Transformer: {_name(loaded)} cannot be used ({error})") from error
    return cast(VisionTransformer, network), spec


def _check(job: _Job) -> None:
    request, count = job.request, len(job.images)
    if count < MIN_IMAGES:
        raise AnalysisError(f"{count} image(s): every analysis needs at least {MIN_IMAGES}")
    if not job.models:
        raise AnalysisError("no model given")
    wanted = 2 if request.kind == "compare" or (request.kind == "cka" and request.compare_to) else 1
    if request.kind == "compare" and not request.compare_to:
        raise AnalysisError("compare needs compare_to: the second model of the comparison")
    if request.kind == "cka" and len(job.models) == 2 and not request.compare_to:
        wanted = 2  # the caller passed the second model without naming it: compare across anyway
    if len(job.models) != wanted:
        raise AnalysisError(f"{request.kind} takes {wanted} model(s), got {len(job.models)}")
    if request.kind == "probes" and job.labels is None:
        raise AnalysisError("probes need labels: give one class index per image (e.g. Fashion-MNIST test images)")
    if job.labels is not None and request.kind != "cka":  # CKA does not read labels
        for loaded in job.models:
            classes = len(loaded.labels)
            if int(job.labels.min()) < 0 or int(job.labels.max()) >= classes:
                raise AnalysisError(f"labels must be class indices 0..{classes - 1} of {_name(loaded)}")
    if "vit" in analysis_needs(request.kind, request.representation):  # the API refuses the same from manifests
        _vit(job.models[0], request.kind)
    if request.region is not None and request.kind != "perturb":
        raise AnalysisError("region is a parameter of perturb only")
    if request.kind == "perturb" and request.region is not None:
        _, spec = _vit(job.models[0], request.kind)
        try:
            region_keep(spec.grid, request.region)
        except ValueError as error:
            raise AnalysisError(str(error)) from error
    if request.kind in ("cka", "compare"):
        for loaded in job.models:
            try:
                check_representation(_describe(loaded), request.representation)
            except RepresentationError as error:
                raise AnalysisError(f"{_name(loaded)}: {error}") from error


def _describe(loaded: LoadedModel) -> LayerSpec:
    try:
        return describe(loaded.network)
    except RepresentationError as error:
        raise AnalysisError(f"{_name(loaded)}: {error}") from error


# --- JSON-ready numbers ---------------------------------------------------------------------------


def _numbers(values: Any, decimals: int = DECIMALS) -> Any:
    """Nested lists of floats rounded to ``decimals``; NaN and infinities (no JSON for them) become None."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    array = np.round(np.asarray(values, dtype=np.float64), decimals)
    return _finite(array.tolist())


def _finite(value: Any) -> Any:
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value if math.isfinite(value) else None


# --- CKA ------------------------------------------------------------------------------------------


def _cka_data(job: _Job, result: CKAMatrix) -> dict[str, Any]:
    row_model, column_model = job.models[0], job.models[-1]
    across = len(job.models) == 2  # (the same model twice is still a comparison: all ones on the diagonal)
    data: dict[str, Any] = {
        "representation": job.request.representation,
        "estimator": "minibatch CKA, unbiased HSIC (Nguyen, Raghu & Kornblith 2021), float64",
        "batch_size": job.request.batch_size,
        "batches": result.batches,
        "examples": result.examples,
        "across": across,
        "rows": {"model": _name(row_model), "layers": result.rows},
        "columns": {"model": _name(column_model), "layers": result.columns},
        "matrix": _numbers(result.values),
    }
    if across:
        values = result.values.nan_to_num(nan=-math.inf)
        best = values.argmax(dim=1)
        data["best_match"] = [
            {"row": row, "column": result.columns[int(j)], "cka": _numbers(result.values[i, j])}
            for i, (row, j) in enumerate(zip(result.rows, best, strict=True))
        ]
        if result.rows == result.columns:  # two versions of one architecture: layer b against layer b
            data["same_layer"] = _numbers(result.values.diagonal())
    return data


def _cka_figure(data: dict[str, Any]) -> bytes:
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


def _cka_part(job: _Job) -> dict[str, Any]:
    representation = job.request.representation
    if len(job.models) == 1:
        loaded = job.models[0]
        result = cka_within(loaded.network, job.steps.over(job.batches(loaded)), representation)
        return _cka_data(job, result)
    first, second = job.models
    pairs = zip(job.batches(first), job.batches(second), strict=True)
    result = cka_across(first.network, second.network, job.steps.over(pairs), representation)
    return _cka_data(job, result)


def _run_cka(job: _Job) -> AnalysisOutcome:
    job.steps.plan(len(job.spans))
    data = _cka_part(job)
    return AnalysisOutcome(data, {"cka": _cka_figure(data)})


# --- attention distance, skip ratios --------------------------------------------------------------


def _attention_part(job: _Job, loaded: LoadedModel) -> dict[str, Any]:
    model, spec = _vit(loaded, "attention-distance")
    prefix: PrefixConvention = job.request.prefix_rows
    distances = mean_attention_distance(model, job.steps.over(job.batches(loaded)), prefix=prefix)
    return {
        "model": _name(loaded),
        "prefix_rows": job.request.prefix_rows,
        "prefix": prefix,
        "unit": "pixels of the model input",
        "grid": list(spec.grid),
        "patch_size": list(spec.patch_size),
        "layers": [f"block {b}" for b in range(1, spec.depth + 1)],
        "distances": _numbers(distances, 4),
        "mean_per_block": _numbers(distances.mean(dim=1), 4),
    }


def _attention_figure(parts: Sequence[dict[str, Any]]) -> bytes:
    series = {part["model"]: np.asarray(part["distances"], dtype=np.float64) for part in parts}
    names = " vs ".join(series)
    return figures.head_scatter(series, title=f"{names}: mean attention distance per head ({parts[0]['prefix']})")


def _run_attention_distance(job: _Job) -> AnalysisOutcome:
    job.steps.plan(len(job.spans))
    data = _attention_part(job, job.models[0])
    return AnalysisOutcome(data, {"attention_distance": _attention_figure([data])})


def _skip_supported(loaded: LoadedModel) -> bool:
    network = loaded.network
    if isinstance(network, VisionTransformer):
        try:
            inspect_vit(network)
            return True
        except UnsupportedModelError:
            return False
    return bool(residual_blocks(network))


def _skip_part(job: _Job, loaded: LoadedModel) -> dict[str, Any]:
    network = loaded.network
    batches = job.steps.over(job.batches(loaded))
    if isinstance(network, VisionTransformer):
        _vit(loaded, "skip-ratio")
        ratios = skip_ratios(network, batches)
        return {
            "model": _name(loaded),
            "architecture": "vit",
            "aggregation": "mean over images of the per-token ratio ||z|| / ||f(z)||; image tokens: also over tokens",
            "layers": [f"block {b}" for b in range(1, len(ratios["mlp_image"]) + 1)],
            **{key: _numbers(value, 4) for key, value in ratios.items()},
        }
    if not residual_blocks(network):
        raise AnalysisError(f"skip-ratio needs a ViT or a ResNet-family CNN: {_name(loaded)} has no residual blocks")
    result = cnn_skip_ratios(network, batches)
    return {
        "model": _name(loaded),
        "architecture": "cnn",
        "aggregation": "mean over images of the mean over positions of ||shortcut(z)|| / ||f(z)||",
        "layers": result["blocks"],
        "block_image": _numbers(result["block_image"], 4),
    }


def _skip_figure(data: dict[str, Any]) -> bytes:
    if data["architecture"] == "vit":
        curves = {
            "attention, CLS": data["attention_cls"],
            "attention, image tokens": data["attention_image"],
            "MLP, CLS": data["mlp_cls"],
            "MLP, image tokens": data["mlp_image"],
        }
        curves = {name: values for name, values in curves.items() if any(v is not None for v in values)}
    else:
        curves = {"residual branch, all positions": data["block_image"]}
    return figures.layer_curves(
        data["layers"], curves, title=f"{data['model']}: skip-connection ratio", ylabel="||z|| / ||f(z)||"
    )


def _run_skip_ratio(job: _Job) -> AnalysisOutcome:
    job.steps.plan(len(job.spans))
    data = _skip_part(job, job.models[0])
    return AnalysisOutcome(data, {"skip_ratio": _skip_figure(data)})


# --- localisation, probes -------------------------------------------------------------------------


def _run_localization(job: _Job) -> AnalysisOutcome:
    loaded = job.models[0]
    model, spec = _vit(loaded, "localization")
    job.steps.plan(len(job.spans))
    maps = localisation_cka(model, job.steps.over(job.batches(loaded)))
    data = {
        "model": _name(loaded),
        "layer": f"block {spec.depth}",
        "grid": list(spec.grid),
        "patch_size": list(spec.patch_size),
        "examples": maps.examples,
        "maps": _numbers(maps.maps, 4),
        "best_patch": maps.best_patches().tolist(),
        "own_position_share": round(maps.own_position_share(), 4),
        "mean_offset_px": round(maps.mean_offset(spec.patch_size), 4),
    }
    title = f"{_name(loaded)}: CKA of each final-layer token with every input patch ({maps.examples} images)"
    return AnalysisOutcome(data, {"localization": figures.localisation_grid(maps.maps.numpy(), spec.grid, title=title)})


def _probe_part(job: _Job, loaded: LoadedModel) -> dict[str, Any]:
    assert job.labels is not None
    network = loaded.network
    try:
        positions = probe_positions(_describe(loaded), job.request.representation)
    except ValueError as error:
        raise AnalysisError(f"{_name(loaded)}: {error}") from error
    labelled = ((batch, cast(torch.Tensor, labels)) for batch, labels in job.labelled(loaded))
    curves = layer_probes(
        network, job.steps.over(labelled), len(loaded.labels), job.request.representation, job.request.ridge
    )
    return {
        "model": _name(loaded),
        "layers": curves.layers,
        "positions": positions,
        "split": {"rule": SPLIT_RULE, "train": curves.train, "test": curves.test},
        "ridge": job.request.ridge,
        "probes": {position: _numbers(values, 4) for position, values in curves.accuracy.items()},
        "projection": None if curves.projection is None else _numbers(curves.projection, 4),
        "projection_convention": {"norm": "fresh", "bias": True, "readout": "the model's pooled read-out"},
        "chance": round(1 / len(loaded.labels), 4),
    }


def _probe_figure(data: dict[str, Any]) -> bytes:
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


def _run_probes(job: _Job) -> AnalysisOutcome:
    job.steps.plan(len(job.spans))
    data = _probe_part(job, job.models[0])
    return AnalysisOutcome(data, {"probes": _probe_figure(data)})


# --- memories, perturbations ----------------------------------------------------------------------


def _random_copy(loaded: LoadedModel) -> VisionTransformer:
    """A random-initialised model of the same architecture (seeded; the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        model = create_architecture(loaded.entry.manifest)
    model = model.eval().to(loaded.device)
    assert isinstance(model, VisionTransformer)
    return model


def _agreement_chance(hidden: int, k: int = AGREEMENT_K) -> float:
    """P(any of k units drawn at random is among k given ones), out of ``hidden``."""
    miss = 1.0
    for i in range(k):
        miss *= (hidden - k - i) / (hidden - i)
    return 1.0 - miss


def _run_memories(job: _Job) -> AnalysisOutcome:
    loaded = job.models[0]
    model, spec = _vit(loaded, "memories")
    job.steps.plan(2 * len(job.spans))
    random_model = _random_copy(loaded)
    top = job.request.top_memories
    summary: dict[str, Any] = {}
    attention: dict[str, Any] = {}
    scores: torch.Tensor | None = None
    for name, network in (("trained", model), ("random", random_model)):
        directions = class_directions(network)
        mlp_scores = memory_scores(network, directions)
        scores = mlp_scores if name == "trained" else scores
        statistics = memory_statistics(mlp_scores, top)
        agreement = key_value_agreement(network, mlp_scores, job.steps.over(job.labelled(loaded)))
        summary[name] = {key: _numbers(value, 4) for key, value in statistics.items()}
        summary[name]["key_value_agreement"] = _numbers(agreement, 4)
        attention_statistics = memory_statistics(attention_value_scores(network, directions), top)
        attention[name] = {key: _numbers(value, 4) for key, value in attention_statistics.items()}
    assert scores is not None
    hidden = scores.shape[-1]
    listed = top_memories(scores, top)
    data: dict[str, Any] = {
        "model": _name(loaded),
        "convention": "P[c, k] = cos(E_g[c], v_k): E_g = head weight times the final norm's gain, rows centred; "
        "v_k = column k of fc2.weight; no bias",
        "top": top,
        "hidden_units": hidden,
        "layers": [f"block {b}" for b in range(1, spec.depth + 1)],
        "classes_of": "labels" if job.labels is not None else "predictions",
        "random_seed": RANDOM_SEED,
        "agreement_chance": round(_agreement_chance(hidden), 4),
        "mlp": summary,
        "attention": attention,
        "top_memories": [
            {
                label: [{"unit": unit, "score": round(score, 4)} for unit, score in units]
                for label, units in zip(loaded.labels, block, strict=True)
            }
            for block in listed
        ],
    }
    layers: list[str] = data["layers"]
    chance: float = data["agreement_chance"]
    trained, random = summary["trained"], summary["random"]
    figure_scores = figures.layer_curves(
        layers,
        {
            "top score, trained": trained["top_score"],
            "top score, random init": random["top_score"],
            "margin, trained": trained["margin"],
            "margin, random init": random["margin"],
        },
        title=f"{_name(loaded)}: top-{top} MLP memories per class",
        ylabel="cosine with the class direction",
    )
    figure_agreement = figures.layer_curves(
        layers,
        {
            "exclusive share, trained": trained["exclusive_share"],
            "exclusive share, random init": random["exclusive_share"],
            "key-value agreement, trained": trained["key_value_agreement"],
            "key-value agreement, random init": random["key_value_agreement"],
        },
        title=f"{_name(loaded)}: memories that promote their class",
        ylabel="share",
        limits=(0.0, 1.02),
        reference=(chance, "agreement by chance"),
    )
    return AnalysisOutcome(data, {"memories": figure_scores, "memories_agreement": figure_agreement})


def _run_perturb(job: _Job) -> AnalysisOutcome:
    loaded = job.models[0]
    model, spec = _vit(loaded, "perturb")
    job.steps.plan(len(job.spans))
    region = job.request.region or default_region(spec.grid)
    effects = perturbation_effects(model, job.steps.over(job.labelled(loaded)), region)
    curves = {name.replace("-", "_"): _numbers(values, 4) for name, values in effects["curves"].items()}
    layers = ["embedding", *(f"block {b}" for b in range(1, spec.depth + 1))]
    targets = "true class" if job.labels is not None else "predicted class"
    data = {
        "model": _name(loaded),
        "layers": layers,
        "targets": targets,
        "projection_convention": {"norm": "fresh", "bias": True},
        "region": list(region),
        "region_default": job.request.region is None,
        "kept_tokens": effects["kept_tokens"],
        "image_tokens": spec.num_image_tokens,
        "identifiability": curves,
        "top1_hits": {name.replace("-", "_"): round(value, 4) for name, value in effects["hits"].items()},
    }
    labels = {
        "original": "unperturbed",
        "self_only": "self-only attention",
        "no_cls": "no attention to prefix tokens",
        "context_original": "unperturbed, kept tokens",
        "context": f"region {list(region)} dropped, kept tokens",
    }
    figure = figures.layer_curves(
        layers,
        {labels[name]: values for name, values in curves.items()},
        title=f"{_name(loaded)}: identifiability of the {targets} at image tokens",
        ylabel="mean identifiability 1 - rank / C",
        limits=(0.0, 1.02),
        reference=(0.5, "about chance"),
    )
    return AnalysisOutcome(data, {"perturb": figure})


# --- compare: the report --------------------------------------------------------------------------


def _run_compare(job: _Job) -> AnalysisOutcome:
    first, second = job.models
    vits = [isinstance(m.network, VisionTransformer) and _is_lens_vit(m) for m in job.models]
    skips = [_skip_supported(m) for m in job.models]
    per_model_passes = sum(vits) + sum(skips) + (2 if job.labels is not None else 0)
    job.steps.plan(len(job.spans) * (1 + per_model_passes))
    cka = _cka_part(job)
    data: dict[str, Any] = {"models": [_name(first), _name(second)], "cka": cka, "per_model": []}
    outcome = AnalysisOutcome(data, {"cka": _cka_figure(cka)})
    for suffix, loaded, vit, skip in zip(("a", "b"), job.models, vits, skips, strict=True):
        part: dict[str, Any] = {"model": _name(loaded)}
        part["attention_distance"] = _attention_part(job, loaded) if vit else None
        part["skip_ratio"] = _skip_part(job, loaded) if skip else None
        part["probes"] = _probe_part(job, loaded) if job.labels is not None else None
        if part["skip_ratio"] is not None:
            outcome.figures[f"skip_ratio_{suffix}"] = _skip_figure(part["skip_ratio"])
        if part["probes"] is not None:
            outcome.figures[f"probes_{suffix}"] = _probe_figure(part["probes"])
        data["per_model"].append(part)
    distances = [part["attention_distance"] for part in data["per_model"] if part["attention_distance"] is not None]
    if distances:  # one scatter for both models: one scale
        outcome.figures["attention_distance"] = _attention_figure(distances)
    outcome.figures["report"] = _report(job, data, outcome.figures)
    return outcome


def _is_lens_vit(loaded: LoadedModel) -> bool:
    try:
        inspect_vit(loaded.network)
    except UnsupportedModelError:
        return False
    return True


def _report(job: _Job, data: dict[str, Any], pictures: dict[str, bytes]) -> bytes:
    first, second = job.models
    summary = Table(
        ["", "model A", "model B"],
        [
            ["model", _name(first), _name(second)],
            ["architecture", first.entry.manifest.architecture, second.entry.manifest.architecture],
            ["weights sha256", first.ref.weights_sha256[:16], second.ref.weights_sha256[:16]],
            ["layers compared", len(data["cka"]["rows"]["layers"]), len(data["cka"]["columns"]["layers"])],
            ["images", len(job.images), len(job.images)],
            ["labels", "yes" if job.labels is not None else "no", "yes" if job.labels is not None else "no"],
        ],
        caption=f"Representation {job.request.representation}, batches of {job.request.batch_size} images.",
    )
    cka = data["cka"]
    cka_table = Table(
        ["layer of A", "most similar layer of B", "CKA"],
        [[match["row"], match["column"], match["cka"]] for match in cka["best_match"]],
    )
    tables = [cka_table]
    if "same_layer" in cka:
        same = cka["same_layer"]
        tables.insert(
            0,
            Table(
                ["layer", "CKA(A, B) at the same layer"],
                [[n, v] for n, v in zip(cka["rows"]["layers"], same, strict=True)],
                caption="The regression-test figure: 1 means the layer represents the images alike in both models.",
            ),
        )
    sections = [
        Section(
            "Centred kernel alignment between the two models",
            "Minibatch CKA with the unbiased HSIC over the same images in the same order (rows paired).",
            [("CKA, every layer of A against every layer of B", pictures["cka"])],
            tables,
        )
    ]
    parts = data["per_model"]
    for key, title, note in (
        ("attention_distance", "Mean attention distance", "Per head, in pixels of the model input (ViTs only)."),
        (
            "skip_ratio",
            "Skip-connection ratio",
            "||z|| / ||f(z)|| per block: large means the block mostly passes its input on.",
        ),
        ("probes", "Linear probes and the class-embedding projection", SPLIT_RULE),
    ):
        if key == "attention_distance":
            figures_here = [("both models, every head", pictures[key])] if key in pictures else []
        else:
            figures_here = [
                (part["model"], pictures[f"{key}_{suffix}"])
                for suffix, part in zip(("a", "b"), parts, strict=True)
                if part[key] is not None
            ]
        if not figures_here:
            continue
        section_tables = [_part_table(key, part[key]) for part in parts if part[key] is not None]
        sections.append(Section(title, note, figures_here, section_tables))
    if job.labels is None:
        sections.append(Section("Linear probes", "Not run: the images came without labels."))
    return html_report(f"ClassLens comparison: {_name(first)} vs {_name(second)}", summary, sections)


def _part_table(key: str, part: dict[str, Any]) -> Table:
    layers = part["layers"]
    if key == "attention_distance":
        return Table(
            ["layer", "mean over heads (px)", "min head", "max head"],
            [
                [layer, mean, min(row), max(row)]
                for layer, mean, row in zip(layers, part["mean_per_block"], part["distances"], strict=True)
            ],
            caption=part["model"],
        )
    if key == "skip_ratio":
        names = [n for n in ("attention_cls", "attention_image", "mlp_cls", "mlp_image", "block_image") if n in part]
        return Table(
            ["layer", *names],
            [[layer, *(part[n][i] for n in names)] for i, layer in enumerate(layers)],
            caption=part["model"],
        )
    positions = list(part["probes"])
    headers = ["layer", *(f"probe {p}" for p in positions)] + (["projection"] if part["projection"] is not None else [])
    rows = [
        [layer, *(part["probes"][p][i] for p in positions)]
        + ([part["projection"][i]] if part["projection"] is not None else [])
        for i, layer in enumerate(layers)
    ]
    return Table(headers, rows, caption=f"{part['model']}: held-out accuracy ({part['split']['test']} images)")


def _run_residual(job: _Job) -> AnalysisOutcome:
    """Categorical updates and residual composition per block (METHODS.md section 1), image-weighted over batches."""
    loaded = job.models[0]
    model, spec = _vit(loaded, "residual")
    projection = ClassProjection(model)
    job.steps.plan(len(job.spans))
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for batch, labels in job.steps.over(job.labelled(loaded)):
        with torch.no_grad():
            targets = labels if labels is not None else model(batch).argmax(-1)
        logits = stream_logits(model, batch, projection)  # one traced pass serves both analyses
        parts = {
            **{f"update_{k}": v for k, v in categorical_updates(model, batch, targets, logits=logits).items()},
            **{f"composition_{k}": v for k, v in residual_composition(model, batch, logits=logits).items()},
        }
        for name, value in parts.items():
            sums[name] = sums.get(name, 0) + value.double().cpu() * len(batch)
        count += len(batch)
    data = {
        "model": _name(loaded),
        "target": "true class" if job.labels is not None else "predicted class",
        "layers": [f"block {b}" for b in range(1, spec.depth + 1)],
        **{name: _numbers(total / count, 4) for name, total in sums.items()},
    }
    composition = figures.layer_curves(
        data["layers"],
        {
            "x_b top-1 = a_b's": data["composition_attention"],
            "x_b top-1 = m_b's": data["composition_mlp"],
            "x_b top-1 = x_(b-1)'s": data["composition_previous"],
            "none of them": data["composition_composed"],
        },
        title=f"{data['model']}: residual composition (image tokens)",
        ylabel="share of image tokens",
    )
    updates = figures.layer_curves(
        data["layers"],
        {
            f"{data['target']} logit rises (share)": data["update_rises"],
            "attention update z(a_b) - z(x_(b-1))": data["update_attention_update"],
            "MLP update z(m_b) - z(x')": data["update_mlp_update"],
        },
        title=f"{data['model']}: categorical updates (image tokens)",
        ylabel="share / logit",
    )
    return AnalysisOutcome(data, {"composition": composition, "updates": updates})


_RUNNERS: dict[str, Callable[[_Job], AnalysisOutcome]] = {
    "cka": _run_cka,
    "attention-distance": _run_attention_distance,
    "skip-ratio": _run_skip_ratio,
    "localization": _run_localization,
    "probes": _run_probes,
    "memories": _run_memories,
    "perturb": _run_perturb,
    "residual": _run_residual,
    "compare": _run_compare,
}
