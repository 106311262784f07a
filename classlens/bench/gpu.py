"""The GPU run: explain against inference throughput in float32, float16 and bfloat16, and what half precision costs.

One command for a machine with a CUDA GPU (``make bench-gpu``; docs/gpu.md), written to fit in
a few minutes of borrowed GPU time and to write one JSON whatever happens:

1. **checks**: the CUDA path gives the CPU's answer: the bundled ``fmnist-vit`` explained on
   the GPU in float32 against the same images on the CPU (top-1 equal, logit maps within a
   bound), and the per-GPU worker plan seen from ``nvidia-smi``. A failed check is recorded
   and makes the command exit non-zero; the measurements still run.
2. **throughput**: a random-initialised ``vit_base_patch16_224`` at batch 1, 8 and 64 in each
   precision: images per second of the plain forward pass in that precision (inference) and
   of a full explain (every layer, sublayers, top-3 targets, maps at every layer) whose forward
   pass runs in that precision (:func:`worker.runtime.half_tracer`), and their ratio.
3. **tolerance**: for each half precision, the same explain against float32's on the same
   images: top-1 agreement, the largest logit-map difference, the share of token ranks that
   change (as docs/gpu.md reports them from CPU kernels).

``--device cpu`` runs the same code on the CPU at toy sizes, which is how the tests check it
on machines without a GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer

from classlens.bench.lens import BenchModel, environment, random_imagenet_vit
from classlens.core.contract import ExplainRequest, Explanation
from worker.lens.explain import explain
from worker.runtime import HALF_DTYPES, half_tracer, load

PRECISIONS = ("float32", "float16", "bfloat16")
THROUGHPUT_GOAL = 0.9  # explain / inference throughput wanted at the largest batch in float16


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(method: Callable[[], object], batch: int, device: torch.device, repeats: int) -> float:
    """Median throughput over ``repeats`` timed calls after two untimed ones."""
    for _ in range(2):
        method()
    seconds = []
    for _ in range(repeats):
        _synchronise(device)
        start = time.perf_counter()
        method()
        _synchronise(device)
        seconds.append(time.perf_counter() - start)
    return batch / statistics.median(seconds)


def logit_maps(explanation: Explanation) -> dict[tuple[int, str], np.ndarray]:
    """Every target's residual-stream map at every layer, keyed by (class, layer)."""
    return {
        (target.index, layer): np.asarray(values, dtype=np.float64)
        for target in explanation.targets
        for layer, values in target.projection_maps.items()
    }


def tolerance(reference: Sequence[Explanation], other: Sequence[Explanation]) -> dict[str, float]:
    """How far ``other`` is from ``reference`` (same images, both logit-map requests).

    Top-1 agreement; the largest difference of a logit map over the targets both share, beside
    the largest map value for scale; the share of pooled ranks (every shared target, every
    layer) that differ.
    """
    agree = sum(a.prediction[0].index == b.prediction[0].index for a, b in zip(reference, other, strict=True))
    largest, scale, ranks, changed = 0.0, 0.0, 0, 0
    for a, b in zip(reference, other, strict=True):
        first, second = logit_maps(a), logit_maps(b)
        for key in first.keys() & second.keys():
            largest = max(largest, float(np.abs(first[key] - second[key]).max()))
            scale = max(scale, float(np.abs(first[key]).max()))
        theirs = {target.index: target.pooled_ranks for target in b.targets}
        for target in a.targets:
            if target.index in theirs:
                ranks += len(target.pooled_ranks)
                changed += sum(x != y for x, y in zip(target.pooled_ranks, theirs[target.index], strict=True))
    return {
        "top1_agreement": agree / len(reference),
        "max_logit_map_difference": round(largest, 6),
        "largest_logit_map_value": round(scale, 6),
        "pooled_ranks_changed": round(changed / ranks, 6) if ranks else 0.0,
    }


def _request(depth: int, map_kind: str = "logit") -> ExplainRequest:
    return ExplainRequest(top_k=3, layers=list(range(depth + 1)), sublayers=True, map_kind=map_kind)


def checks(device: torch.device, map_bound: float = 1e-3) -> list[dict[str, Any]]:
    """The CUDA path's answers against the CPU's on the bundled model (float32)."""
    from PIL import Image

    from model_store.catalog import BUNDLED_SAMPLES, Catalog

    entry = Catalog.default().resolve("fmnist-vit")
    images = [Image.open(path) for path in sorted(BUNDLED_SAMPLES.glob("*.png"))[:8]]
    on_cpu, on_device = load(entry, torch.device("cpu")), load(entry, device)
    request = _request(on_cpu.spec.depth)
    found = tolerance(on_cpu.explain(images, request), on_device.explain(images, request))
    results = [
        {
            "check": f"fmnist-vit explained on {device} equals the CPU's",
            "figures": found,
            "passed": found["top1_agreement"] == 1.0 and found["max_logit_map_difference"] <= map_bound,
            "bound": map_bound,
        }
    ]
    if device.type == "cuda":
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout
        gpus = [line for line in listed.splitlines() if line.startswith("GPU ")]
        results.append(
            {
                "check": "nvidia-smi lists the GPUs torch sees",
                "figures": {"nvidia_smi": len(gpus), "torch": torch.cuda.device_count()},
                "passed": len(gpus) == torch.cuda.device_count(),
            }
        )
    return results


def throughput(
    architecture: str, batches: Sequence[int], device: torch.device, repeats: int, img_size: int | None = None
) -> list[dict[str, Any]]:
    """Inference and explain throughput per precision and batch, and half precision's tolerance."""
    subject = random_imagenet_vit(architecture) if img_size is None else _small(architecture, img_size)
    model = subject.model.to(device).eval().requires_grad_(False)
    records = []
    for batch in batches:
        images = torch.randn(batch, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(0))
        images = images.to(device)
        reference = explain(model, images, subject.labels, _request(len(model.blocks)), subject.ref)
        for precision in PRECISIONS:
            records.append(_one_precision(subject, model, images, precision, repeats, reference))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return records


def _one_precision(
    subject: BenchModel,
    model: VisionTransformer,
    images: torch.Tensor,
    precision: str,
    repeats: int,
    reference: Sequence[Explanation],
) -> dict[str, Any]:
    dtype = HALF_DTYPES.get(precision)
    forward_model = model if dtype is None else copy.deepcopy(model).to(dtype)
    tracer = None if dtype is None else half_tracer(model, dtype)
    inputs = images if dtype is None else images.to(dtype)
    depth, batch, device = len(model.blocks), len(images), images.device
    request = _request(depth, "identifiability")

    def forward() -> object:
        with torch.no_grad():
            return forward_model(inputs)

    def explained() -> object:
        return explain(model, images, subject.labels, request, subject.ref, tracer=tracer)

    inference = images_per_second(forward, batch, device, repeats)
    explanation = images_per_second(explained, batch, device, repeats)
    record: dict[str, Any] = {
        "model": subject.label,
        "batch": batch,
        "precision": precision,
        "inference_images_per_s": round(inference, 2),
        "explain_images_per_s": round(explanation, 2),
        "explain_to_inference": round(explanation / inference, 3),
    }
    if tracer is not None:
        logits = explain(model, images, subject.labels, _request(depth), subject.ref, tracer=tracer)
        record["tolerance"] = tolerance(reference, logits)
    return record


def _small(architecture: str, img_size: int) -> BenchModel:
    """A random ViT at a toy image size (the CPU rehearsal of the GPU run)."""
    from classlens.core.contract import ModelRef
    from worker.random_models import random_vit

    model = random_vit(architecture, img_size=img_size)
    ref = ModelRef(name=f"{architecture}-random", version="0", weights_sha256="0" * 64)
    return BenchModel(f"{ref.name}@{img_size}", model, [f"class {i}" for i in range(model.num_classes)], ref)


def run(
    device: torch.device,
    architecture: str,
    batches: Sequence[int],
    repeats: int,
    img_size: int | None = None,
) -> dict[str, Any]:
    """The whole run as one record: environment, checks, throughput, and the goal's verdict."""
    record: dict[str, Any] = {"environment": environment(), "device": str(device)}
    record["checks"] = checks(device)
    record["throughput"] = throughput(architecture, batches, device, repeats, img_size)
    largest = max(batches)
    goal = [r for r in record["throughput"] if r["batch"] == largest and r["precision"] == "float16"]
    record["goal"] = {
        "explain_to_inference_at_largest_batch_float16": goal[0]["explain_to_inference"] if goal else None,
        "wanted": THROUGHPUT_GOAL,
        "met": bool(goal) and goal[0]["explain_to_inference"] >= THROUGHPUT_GOAL,
    }
    return record


def main(arguments: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (the GPU run) or cpu (a rehearsal at toy sizes)")
    parser.add_argument("--architecture", default="vit_base_patch16_224")
    parser.add_argument("--batch", dest="batches", type=int, action="append", help="repeatable; 1, 8, 64 by default")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--img-size", type=int, default=None, help="a toy image size (for a CPU rehearsal)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/gpu.json"))
    options = parser.parse_args(arguments)
    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run it on a GPU machine, or rehearse with --device cpu", file=sys.stderr)
        return 2
    record = run(device, options.architecture, options.batches or [1, 8, 64], options.repeats, options.img_size)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    for row in record["throughput"]:
        print(
            f"{row['model']:<28} batch {row['batch']:>3} {row['precision']:<9} inference "
            f"{row['inference_images_per_s']:>9.1f}/s explain {row['explain_images_per_s']:>9.1f}/s "
            f"ratio {row['explain_to_inference']:.3f}"
        )
    failed = [check["check"] for check in record["checks"] if not check["passed"]]
    for name in failed:
        print(f"check failed: {name}", file=sys.stderr)
    print(f"wrote {options.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
