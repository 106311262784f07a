"""The lens benchmark: what an explanation costs next to the plain forward pass.

In one run, on the same model and batch: the plain forward pass, a full explain
(all layers, all tokens, sublayers, top-3 targets, projection maps at every
layer), the gradient relevance map, Grad-CAM and Captum's Integrated Gradients
(50 steps), each as a median time, a ratio to the forward pass, and peak extra
memory. Run with ``make bench`` or ``classlens bench``.
"""

from __future__ import annotations

import platform
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer

from classlens.bench.measure import measure_round_robin
from classlens.core.contract import ExplainRequest, ModelRef
from worker.lens.baselines import grad_cam
from worker.lens.explain import explain
from worker.lens.gradient import gradient_relevance
from worker.lens.projection import ClassProjection
from worker.random_models import random_vit


@dataclass(frozen=True)
class BenchModel:
    label: str
    model: VisionTransformer
    labels: list[str]
    ref: ModelRef


def random_imagenet_vit(architecture: str, seed: int = 0) -> BenchModel:
    """A random-initialised timm ViT with 1,000 classes: the cost of a real ImageNet model without its weights."""
    model = random_vit(architecture, seed=seed)
    ref = ModelRef(name=f"{architecture}-random", version="0", weights_sha256="0" * 64)
    return BenchModel(ref.name, model, [f"class {i}" for i in range(model.num_classes)], ref)


def integrated_gradients(model: VisionTransformer, steps: int = 50) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    """Captum's Integrated Gradients from a black baseline, for the top-1 target of each image."""
    from captum.attr import IntegratedGradients

    method = IntegratedGradients(model)

    def run(images: torch.Tensor, target: torch.Tensor) -> Any:
        with torch.enable_grad():
            return method.attribute(images, target=target, n_steps=steps, internal_batch_size=max(len(images), 10))

    return run


def onnxruntime_methods(
    subject: BenchModel, images: torch.Tensor, request: ExplainRequest, device: torch.device
) -> dict[str, Callable[[], object]]:
    """``onnx_forward`` (the model itself on onnxruntime) and ``onnx_explain`` (explain traced by its explainer graph).

    Both graphs are exported afresh from the model, with as many onnxruntime
    threads as torch uses, so that the two engines are compared like with like.
    """
    from worker.onnx_explainer import OnnxExplainer, open_session
    from worker.onnx_export import INPUT_NAME, export_explainer, export_plain

    model = subject.model
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as folder:
        plain_path, explainer_path = Path(folder) / "plain.onnx", Path(folder) / "explainer.onnx"
        export_plain(model, plain_path)
        export_explainer(model, explainer_path)
        plain = open_session(plain_path.read_bytes(), subject.label, device, threads)
        explainer = OnnxExplainer.unregistered(explainer_path.read_bytes(), subject.label, device, threads)
    feed = {INPUT_NAME: np.ascontiguousarray(images.cpu().numpy(), dtype=np.float32)}
    return {
        "onnx_forward": lambda: plain.run(None, feed),
        "onnx_explain": lambda: explain(model, images, subject.labels, request, subject.ref, tracer=explainer.trace),
    }


def bench_model(
    subject: BenchModel,
    batch: int,
    device: torch.device,
    repeats: int = 7,
    slow_repeats: int = 1,
    with_ig: bool = True,
    with_onnx: bool = False,
) -> dict[str, Any]:
    model = subject.model.to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    channels = model.patch_embed.proj.in_channels
    images = torch.randn(batch, channels, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(0))
    images = images.to(device)
    depth = len(model.blocks)
    request = ExplainRequest(top_k=3, layers=list(range(depth + 1)), sublayers=True)
    projection = ClassProjection(model)
    with torch.no_grad():
        top3 = model(images).topk(3, dim=-1).indices

    def forward() -> Any:
        with torch.no_grad():
            return model(images)

    methods: dict[str, Callable[[], object]] = {
        "forward": forward,
        "explain": lambda: explain(model, images, subject.labels, request, subject.ref),
        "gradient_map": lambda: gradient_relevance(images, top3, projection),
        "grad_cam": lambda: grad_cam(model, images, top3),
    }
    fewer = max(3, repeats // 2)
    repeat = {"forward": repeats, "explain": repeats, "gradient_map": fewer, "grad_cam": fewer}
    if with_onnx:
        methods.update(onnxruntime_methods(subject, images, request, device))
        repeat.update({"onnx_forward": repeats, "onnx_explain": repeats})
    if with_ig:
        ig = integrated_gradients(model)
        methods["integrated_gradients"] = lambda: ig(images, top3[:, 0])
        repeat["integrated_gradients"] = slow_repeats
    results = measure_round_robin(methods, repeat, device)
    forward_median = results["forward"].median
    record: dict[str, Any] = {
        "model": subject.label,
        "batch": batch,
        "device": str(device),
        "methods": {
            name: {
                "median_ms": round(result.median * 1000, 2),
                "ratio_to_forward": round(result.median / forward_median, 3),
                "peak_extra_mib": round(result.peak_bytes / 2**20, 1),
                "repeats": len(result.seconds),
                "targets": 1 if name == "integrated_gradients" else (None if name == "forward" else 3),
            }
            for name, result in results.items()
        },
    }
    if with_onnx:  # explain on onnxruntime against torch's explain and against onnxruntime's own forward
        onnx_explain = results["onnx_explain"].median
        record["onnxruntime"] = {
            "explain_speedup_over_torch": round(results["explain"].median / onnx_explain, 3),
            "explain_to_onnx_forward": round(onnx_explain / results["onnx_forward"].median, 3),
            "forward_speedup_over_torch": round(forward_median / results["onnx_forward"].median, 3),
        }
    return record


def environment() -> dict[str, Any]:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def format_table(records: list[dict[str, Any]]) -> str:
    lines = [
        f"{'model':<26} {'batch':>5} {'method':<22} {'median ms':>10} {'x forward':>10} {'peak MiB':>9}",
    ]
    for record in records:
        for name, figures in record["methods"].items():
            lines.append(
                f"{record['model']:<26} {record['batch']:>5} {name:<22} {figures['median_ms']:>10.1f} "
                f"{figures['ratio_to_forward']:>10.2f} {figures['peak_extra_mib']:>9.1f}"
            )
    return "\n".join(lines)
