"""The lens benchmark: what an explanation costs next to the plain forward pass.

In one run, on the same model and batch: the plain forward pass, a full explain
(all layers, all tokens, sublayers, top-3 targets, projection maps at every
layer), its floor (the forward pass plus the class products alone, :mod:`classlens.bench.floor`),
the gradient relevance map, Grad-CAM and Captum's Integrated Gradients
(50 steps), and with the onnx extra the forward pass and explain on onnxruntime.
Each as a ratio of process CPU time to the forward pass at 1 and at 2 threads, with
its min / median / max over interleaved rounds and the load each round saw
(:mod:`classlens.bench.measure`), wall-clock beside, and peak extra memory. Run with
``make bench`` or ``classlens bench``.
"""

from __future__ import annotations

import os
import platform
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer

from classlens.bench.floor import forward_and_products
from classlens.bench.measure import (
    Round,
    calls_per_reading,
    figure_cells,
    measure_rounds,
    peak_memory,
    round_records,
    spread,
    summarise,
)
from classlens.core.contract import ExplainRequest, ModelRef
from worker.lens.baselines import grad_cam
from worker.lens.explain import explain
from worker.lens.families import open_model
from worker.lens.gradient import gradient_relevance
from worker.lens.projection import ClassProjection
from worker.lens.workspace import Workspace
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
    subject: BenchModel, images: torch.Tensor, request: ExplainRequest, device: torch.device, threads: int
) -> dict[str, Callable[[], object]]:
    """``onnx_forward`` (the model itself on onnxruntime) and ``onnx_explain`` (explain traced by its explainer graph).

    Both graphs are exported afresh from the model, with ``threads`` onnxruntime threads (a
    session's thread count is fixed when it opens), so that the two engines are compared like
    with like at each thread count.
    """
    from worker.onnx_explainer import OnnxExplainer, open_session
    from worker.onnx_export import INPUT_NAME, export_explainer, export_plain

    model = subject.model
    with tempfile.TemporaryDirectory() as folder:
        plain_path, explainer_path = Path(folder) / "plain.onnx", Path(folder) / "explainer.onnx"
        export_plain(model, plain_path)
        export_explainer(model, explainer_path)
        plain = open_session(plain_path.read_bytes(), subject.label, device, threads)
        explainer = OnnxExplainer.unregistered(explainer_path.read_bytes(), subject.label, device, threads)
    feed = {INPUT_NAME: np.ascontiguousarray(images.cpu().numpy(), dtype=np.float32)}
    lens, workspace = open_model(model), Workspace()
    return {
        "onnx_forward": lambda: plain.run(None, feed),
        "onnx_explain": lambda: explain(
            lens, images, subject.labels, request, subject.ref, tracer=explainer.trace, workspace=workspace
        ),
    }


def bench_model(
    subject: BenchModel,
    batch: int,
    device: torch.device,
    rounds: int = 7,
    threads: tuple[int, ...] = (1, 2),
    slow_rounds: int = 1,
    with_ig: bool = True,
    with_onnx: bool = False,
) -> dict[str, Any]:
    """Every method's cost as a ratio to the forward pass, per thread count, with its spread over rounds."""
    model = subject.model.to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    channels = model.patch_embed.proj.in_channels
    images = torch.randn(batch, channels, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(0))
    images = images.to(device)
    depth = len(model.blocks)
    request = ExplainRequest(top_k=3, layers=list(range(depth + 1)), sublayers=True)
    projection = ClassProjection(model)
    lens = open_model(model)  # opened once, as a loaded model holds it
    workspace = Workspace()
    with torch.no_grad():
        top3 = model(images).topk(3, dim=-1).indices

    def forward() -> Any:
        with torch.no_grad():
            return model(images)

    methods: dict[str, Callable[[], object]] = {
        "forward": forward,
        # As a worker explains: the model opened, the buffers and the projection kept from call to call.
        "explain": lambda: explain(lens, images, subject.labels, request, subject.ref, workspace=workspace),
        "gradient_map": lambda: gradient_relevance(images, top3, projection),
        "grad_cam": lambda: grad_cam(model, images, top3),
        # The floor: what an explanation would cost if only its class products were added to the forward.
        "floor": forward_and_products(model, images),
    }
    repeats = dict.fromkeys(methods, rounds) | {"gradient_map": max(3, rounds // 2), "grad_cam": max(3, rounds // 2)}
    if with_ig:
        ig = integrated_gradients(model)
        methods["integrated_gradients"] = lambda: ig(images, top3[:, 0])
        repeats["integrated_gradients"] = slow_rounds
    by_threads = {
        count: methods | (onnxruntime_methods(subject, images, request, device, count) if with_onnx else {})
        for count in threads
    }
    calls = calls_per_reading(forward, device, threads[0])  # enough that a small model's readings are not noise
    readings = measure_rounds(by_threads, rounds, device, repeats, calls=calls)
    figures = summarise(readings, "forward", device)
    peaks = peak_memory(by_threads[threads[0]], device)
    record: dict[str, Any] = {
        "model": subject.label,
        "batch": batch,
        "device": str(device),
        "methods": {
            name: {
                "threads": by_count,
                "peak_extra_mib": round(peaks[name] / 2**20, 1),
                "targets": 1 if name == "integrated_gradients" else (None if name in ("forward", "floor") else 3),
            }
            for name, by_count in figures.items()
        },
        "calls_per_reading": calls,
        "rounds": round_records(readings),
    }
    record["explain_above_floor"] = explain_above_floor(readings, device)
    if with_onnx:
        record["onnxruntime"] = onnxruntime_gains(readings, device)
    return record


def explain_above_floor(readings: Sequence[Round], device: torch.device) -> dict[str, dict[str, float]]:
    """Per thread count, ``(explain - floor) / forward`` within each round: work beyond the class products."""
    primary = "wall_s" if device.type == "cuda" else "cpu_s"
    above: dict[str, dict[str, float]] = {}
    for threads in sorted({reading.threads for reading in readings}):
        at = [getattr(reading, primary) for reading in readings if reading.threads == threads]
        above[str(threads)] = spread([(times["explain"] - times["floor"]) / times["forward"] for times in at])
    return above


def onnxruntime_gains(readings: Sequence[Round], device: torch.device) -> dict[str, dict[str, dict[str, float]]]:
    """Per thread count, torch's time over onnxruntime's for explain and for the forward pass (above 1: a gain)."""
    primary = "wall_s" if device.type == "cuda" else "cpu_s"
    gains: dict[str, dict[str, dict[str, float]]] = {}
    for threads in sorted({reading.threads for reading in readings}):
        at = [getattr(reading, primary) for reading in readings if reading.threads == threads]
        gains[str(threads)] = {
            "explain_speedup_over_torch": spread([times["explain"] / times["onnx_explain"] for times in at]),
            "forward_speedup_over_torch": spread([times["forward"] / times["onnx_forward"] for times in at]),
            "explain_to_onnx_forward": spread([times["onnx_explain"] / times["onnx_forward"] for times in at]),
        }
    return gains


def environment() -> dict[str, Any]:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads_available": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def format_table(records: list[dict[str, Any]]) -> str:
    """One line per model, batch, method and thread count: the CPU-time ratio's median [min-max], wall beside."""
    lines = [
        f"{'model':<26} {'batch':>5} {'method':<22} {'thr':>3} {'CPU ms':>9} {'peak MiB':>9} "
        f"{'x forward (CPU) [min-max]':>20} {'wall x':>7} {'loaded':>7}",
    ]
    for record in records:
        for name, figures in record["methods"].items():
            for threads, at in figures["threads"].items():
                lines.append(
                    f"{record['model']:<26} {record['batch']:>5} {name:<22} {threads:>3} "
                    f"{at['cpu_ms']:>9.1f} {figures['peak_extra_mib']:>9.1f} {figure_cells(at)}"
                )
        for threads, above in record.get("explain_above_floor", {}).items():
            lines.append(
                f"{record['model']:<26} {record['batch']:>5} {'explain - floor':<22} {threads:>3} "
                f"{'':>9} {'':>9} {above['median']:>11.2f} [{above['min']:.2f}-{above['max']:.2f}] x forward"
            )
    return "\n".join(lines)
