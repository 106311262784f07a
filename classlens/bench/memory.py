"""The memory benchmark: does a worker's memory stay flat over many explanations and over many images?

Two figures, each measured in a fresh interpreter (the C library's allocator state is per
process), of the worker as it is (glibc's allocator as it comes; the loaded model's
workspace, :mod:`worker.lens.workspace`, keeps an explanation's large buffers):

- **resident set over explanations**: a worker's RSS after every ``every`` explanations of
  the default request, up to ``count``, in MiB above the model's own forward-pass peak (the
  loaded model's RSS after plain forward passes of the same image): what the lens holds beyond
  what the model needs anyway. A leak or a heap that keeps growing shows as a slope; the
  workspace's buffers are reported beside it;
- **peak of an analysis over images**: the highest RSS of a full layer x layer CKA over ``N``
  random images in batches, for each ``N`` asked for, beside the plain forward passes' peak
  over the same images: an analysis whose memory is flat in ``N`` keeps the same peak. In MiB
  above the process's resident set once the model is loaded.

Run with ``classlens bench-memory``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

_PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE / 2**20


def peak_mib() -> float:
    """The process's highest resident set so far (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> None:
    """Start the process's peak resident set afresh (Linux: ``/proc/self/clear_refs``, then read ``VmHWM``)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def high_water_mib() -> float:
    """The highest resident set since :func:`reset_peak` (``ru_maxrss`` cannot be reset)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def explain_rss(architecture: str, img_size: int, count: int, every: int) -> dict[str, Any]:
    """In this process: RSS after every ``every`` of ``count`` default explanations of one random image each.

    As a worker explains: one model, its workspace kept from call to call.
    """
    import torch

    from classlens.core.contract import ExplainRequest, ModelRef
    from worker.lens.explain import explain
    from worker.lens.workspace import Workspace
    from worker.random_models import random_vit

    torch.set_num_threads(1)
    model = random_vit(architecture, img_size=img_size).eval().requires_grad_(False)
    labels = [f"class {i}" for i in range(model.num_classes)]
    ref = ModelRef(name=architecture, version="0", weights_sha256="0" * 64)
    request = ExplainRequest()
    generator = torch.Generator().manual_seed(0)
    shape = (1, int(model.patch_embed.proj.in_channels), img_size, img_size)
    loaded = resident_mib()
    reset_peak()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(*shape, generator=generator))
    forward_peak = high_water_mib()
    workspace = Workspace()
    explain(model, torch.randn(*shape, generator=generator), labels, request, ref, workspace=workspace)  # warm
    faults = minor_faults()
    samples = []
    start = time.process_time()
    for done in range(1, count + 1):
        explain(model, torch.randn(*shape, generator=generator), labels, request, ref, workspace=workspace)
        if done % every == 0:
            samples.append({"explanations": done, "rss_mib": round(resident_mib() - forward_peak, 1)})
    return {
        "base_rss_mib": round(loaded, 1),
        "forward_peak_mib": round(forward_peak - loaded, 1),
        "workspace_mib": round(workspace.bytes_held / 2**20, 1),
        "samples": samples,
        "minor_faults_per_explanation": round((minor_faults() - faults) / count, 1),
        "cpu_ms_per_explanation": round((time.process_time() - start) / count * 1000, 2),
    }


# The plain forward passes (the bound's base), then the analyses that stream over batches and keep
# only running sums, whose peak must therefore not grow with the number of images. The probes keep one
# feature row per image by design (they are fitted afterwards), so they are not among them.
ANALYSES = ("forward", "cka", "attention-distance", "skip-ratio")


def analysis_peak(architecture: str, img_size: int, images: int, batch: int, method: str) -> dict[str, Any]:
    """In this process: the peak RSS of ``method`` (one of :data:`ANALYSES`) over ``images`` random images."""
    import torch

    from classlens.bench.analyses import image_batches
    from worker.analyses.attention_distance import mean_attention_distance
    from worker.analyses.layer_cka import cka_within
    from worker.analyses.skip_ratio import skip_ratios
    from worker.random_models import random_vit

    torch.set_num_threads(1)
    model = random_vit(architecture, img_size=img_size).eval().requires_grad_(False)
    shape = (int(model.patch_embed.proj.in_channels), img_size, img_size)
    device = torch.device("cpu")

    def run(count: int) -> None:
        batches = image_batches(count, batch, shape, device)
        if method == "cka":
            cka_within(model, batches, "tokens")
        elif method == "attention-distance":
            mean_attention_distance(model, batches)
        elif method == "skip-ratio":
            skip_ratios(model, batches)
        else:
            with torch.no_grad():
                for chunk in batches:
                    model(chunk)

    base = resident_mib()
    run(min(batch, images))  # warm, on one batch: the peak of one batch is the floor of any run
    warm = peak_mib()
    run(images)
    return {
        "images": images,
        "base_rss_mib": round(base, 1),
        # ru_maxrss only rises, so this is the larger of the one-batch and the whole run's peaks:
        # flat in the number of images means equal to one_batch_peak_mib.
        "peak_extra_mib": round(peak_mib() - base, 1),
        "one_batch_peak_mib": round(warm - base, 1),
        "end_extra_mib": round(resident_mib() - base, 1),
    }


def _in_fresh_process(arguments: Sequence[str]) -> dict[str, Any]:
    found = subprocess.run(
        [sys.executable, "-m", "classlens.bench.memory", *arguments], capture_output=True, text=True, check=False
    )
    if found.returncode != 0:
        raise RuntimeError(f"memory measurement {' '.join(arguments)} failed: {found.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(found.stdout.strip().splitlines()[-1])
    return result


def bench_memory(
    architecture: str,
    img_size: int,
    count: int,
    every: int,
    image_counts: Sequence[int],
    batch: int,
    analysis_architecture: str,
    analysis_img_size: int,
) -> dict[str, Any]:
    """Both figures, each in a fresh interpreter."""
    record: dict[str, Any] = {
        "explain_rss": _in_fresh_process(["explain-rss", architecture, str(img_size), str(count), str(every)]),
        "analysis_peak": {
            method: [
                _in_fresh_process(
                    ["analysis-peak", analysis_architecture, str(analysis_img_size), str(n), str(batch), method]
                )
                for n in image_counts
            ]
            for method in ANALYSES
        },
    }
    record["setup"] = {
        "explain": {"architecture": architecture, "img_size": img_size, "explanations": count, "every": every},
        "analysis": {"architecture": analysis_architecture, "img_size": analysis_img_size, "batch": batch},
        "threads": 1,
    }
    return record


def format_table(record: dict[str, Any]) -> str:
    figures = record["explain_rss"]
    samples = " ".join(f"{s['explanations']}:{s['rss_mib']:+.1f}" for s in figures["samples"])
    lines = [
        f"explain RSS above the forward pass's peak ({figures['forward_peak_mib']:.1f} MiB above the loaded model): "
        f"{samples} MiB, of which the workspace {figures['workspace_mib']:.1f} MiB; "
        f"{figures['minor_faults_per_explanation']} minor faults and "
        f"{figures['cpu_ms_per_explanation']} CPU ms per explanation"
    ]
    for method, rows in record["analysis_peak"].items():
        peaks = " ".join(f"{row['images']}:{row['peak_extra_mib']:.1f}" for row in rows)
        lines.append(f"{method} peak extra MiB by images: {peaks}")
    return "\n".join(lines)


def main(arguments: Sequence[str]) -> int:
    """The measurements one fresh interpreter makes (``bench_memory`` starts them); prints one JSON line."""
    what, *rest = arguments
    import worker  # noqa: F401  (the torchvision compatibility step, as in a worker)

    if what == "explain-rss":
        architecture, img_size, count, every = rest
        result = explain_rss(architecture, int(img_size), int(count), int(every))
    else:
        architecture, img_size, images, batch, method = rest
        result = analysis_peak(architecture, int(img_size), int(images), int(batch), method)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
