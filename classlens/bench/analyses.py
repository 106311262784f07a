"""The analyses benchmark: what CKA and mean attention distance cost next to the forward passes alone.

For a random-initialised timm ViT (``vit_base_patch16_224`` at 224x224 by default), over
``N`` images in batches of ``batch``, in one run and round-robin (so that all methods see the
same machine):

- ``forward``: the model's plain forward pass on every batch (no hooks, fused attention);
- ``cka``: the full layer x layer minibatch CKA (docs/methods.md; all tokens
  flattened), which includes the same forward passes, every layer reduced to its U-centred
  Gram as it is produced;
- ``attention_distance``: the mean attention distance per block and head (attention
  probabilities materialised).

Each as a ratio of process CPU time to ``forward`` at 1 and 2 threads (min / median / max over
rounds, :mod:`classlens.bench.measure`) and peak extra memory, at every image count
asked for (256 and 512 by default): memory that does not grow from 256 to 512 images is
the point. The images are random, drawn batch by batch from a fixed seed, so every method
sees the same images and nothing holds the whole set. Run with
``classlens bench --analyses-only``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

from classlens.bench.measure import figure_cells, measure_rounds, peak_memory, round_records, summarise
from worker.analyses.attention_distance import mean_attention_distance
from worker.analyses.layer_cka import cka_within

TARGET_CKA_RATIO = 1.5


def image_batches(
    count: int, batch: int, shape: tuple[int, int, int], device: torch.device, seed: int = 0
) -> Iterator[torch.Tensor]:
    """``count`` random images in batches of ``batch`` (a last batch under 4 joins the one before)."""
    sizes = [min(batch, count - start) for start in range(0, count, batch)]
    if len(sizes) > 1 and sizes[-1] < 4:
        sizes[-2:] = [sizes[-2] + sizes[-1]]
    generator = torch.Generator().manual_seed(seed)
    for size in sizes:
        yield torch.randn(size, *shape, generator=generator).to(device)


def bench_analyses(
    model: VisionTransformer,
    counts: Sequence[int],
    batch: int,
    device: torch.device,
    rounds: int = 1,
    threads: tuple[int, ...] = (1, 2),
) -> list[dict[str, Any]]:
    """One record per image count: per thread count, each method's CPU-time ratio to the forward passes; peak memory."""
    model = model.to(device).eval().requires_grad_(False)  # the analyses need no gradients of the weights
    height, width = model.patch_embed.img_size
    shape = (int(model.patch_embed.proj.in_channels), int(height), int(width))

    def methods(count: int) -> dict[str, Callable[[], object]]:
        def forward() -> None:
            with torch.no_grad():
                for images in image_batches(count, batch, shape, device):
                    model(images)

        return {
            "forward": forward,
            "cka": lambda: cka_within(model, image_batches(count, batch, shape, device), "tokens"),
            "attention_distance": lambda: mean_attention_distance(model, image_batches(count, batch, shape, device)),
        }

    for method in methods(min(batch, min(counts))).values():  # warm up on one batch, untimed
        method()
    records = []
    for count in counts:
        chosen = methods(count)
        readings = measure_rounds(dict.fromkeys(threads, chosen), rounds, device, warmup=0)
        figures = summarise(readings, "forward", device)
        peaks = peak_memory(chosen, device)
        records.append(
            {
                "images": count,
                "batch": batch,
                "methods": {
                    name: {"threads": by_count, "peak_extra_mib": round(peaks[name] / 2**20, 1)}
                    for name, by_count in figures.items()
                },
                "rounds": round_records(readings),
            }
        )
    return records


def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The headline figures: the CKA ratio (median, at each thread count) at the largest count, memory across counts."""
    largest = max(records, key=lambda record: record["images"])
    cka = {threads: at["ratio"]["median"] for threads, at in largest["methods"]["cka"]["threads"].items()}
    distance = largest["methods"]["attention_distance"]["threads"]
    return {
        "cka_ratio_to_forward": cka,
        "cka_target": TARGET_CKA_RATIO,
        "cka_within_target": all(ratio <= TARGET_CKA_RATIO for ratio in cka.values()),
        "attention_distance_ratio_to_forward": {threads: at["ratio"]["median"] for threads, at in distance.items()},
        "peak_extra_mib_by_images": {
            str(record["images"]): {name: m["peak_extra_mib"] for name, m in record["methods"].items()}
            for record in records
        },
    }


def format_table(label: str, records: list[dict[str, Any]]) -> str:
    lines = [
        f"{'model':<30} {'images':>6} {'batch':>5} {'method':<20} {'thr':>3} {'CPU s':>8} {'peak MiB':>9} "
        f"{'x forward [min-max]':>20} {'wall x':>7} {'loaded':>7}"
    ]
    for record in records:
        for name, figures in record["methods"].items():
            for threads, at in figures["threads"].items():
                lines.append(
                    f"{label:<30} {record['images']:>6} {record['batch']:>5} {name:<20} {threads:>3} "
                    f"{at['cpu_ms'] / 1000:>8.3f} {figures['peak_extra_mib']:>9.1f} {figure_cells(at)}"
                )
    return "\n".join(lines)
