"""Which device a worker runs on, and how many worker processes a machine's GPUs call for.

Two rules shape this module (docs/gpu.md):

- A CUDA context does not survive ``fork``: a child of a process that has initialised
  CUDA (even only to ask ``torch.cuda.is_available()``, which initialises the driver)
  cannot use the GPU. So :func:`visible_gpus` and :func:`worker_plan`, which a
  supervising parent calls before it starts its workers, never ask torch; only
  :func:`resolve_device`, called in the process that will run the models, does.
- One worker process per GPU, each seeing only its card through
  ``CUDA_VISIBLE_DEVICES``: every model a worker loads then lives on one card, a
  process's caching allocator never spreads over two, and a crash takes one card's
  worker down, not the others'.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Mapping
from typing import Literal

import torch

log = logging.getLogger(__name__)

DeviceSetting = Literal["auto", "cpu", "cuda"]

# The environment variable CUDA reads to decide which cards a process may see.
VISIBLE = "CUDA_VISIBLE_DEVICES"


class DeviceError(RuntimeError):
    """The device asked for does not exist on this machine."""


def resolve_device(setting: DeviceSetting) -> torch.device:
    """The torch device for ``settings.device`` (``CLASSLENS_DEVICE``). Call only after fork.

    ``"auto"`` is CUDA when torch sees a GPU, else CPU; ``"cuda"`` on a machine where torch
    sees none is an error rather than a silent CPU fallback, since whoever asked for it
    sized timeouts and throughput for a GPU.
    """
    if setting == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if setting == "cuda":
        hidden = os.environ.get(VISIBLE)
        why = f" ({VISIBLE}={hidden!r})" if hidden is not None else ""
        build = "this torch is a CPU-only build" if torch.version.cuda is None else "torch sees no CUDA device"
        raise DeviceError(
            f"CLASSLENS_DEVICE=cuda but {build}{why}; use CLASSLENS_DEVICE=auto or cpu, "
            "or run the worker on a machine with a GPU and a CUDA build of torch"
        )
    return torch.device("cpu")


def visible_gpus(environ: Mapping[str, str] | None = None) -> list[str]:
    """The GPUs this machine offers a worker, as ``CUDA_VISIBLE_DEVICES`` entries, without touching CUDA.

    ``CUDA_VISIBLE_DEVICES``, when set, is the answer (read as CUDA reads it: the list ends
    at the first entry that is not an index or a ``GPU-``/``MIG-`` UUID, so ``""`` and
    ``"-1"`` mean none). Otherwise ``nvidia-smi -L`` lists them; a GPU split into MIG
    instances is replaced by its instances. No ``nvidia-smi``, or one that fails: none.
    """
    environ = os.environ if environ is None else environ
    if VISIBLE in environ:
        return _parse_visible(environ[VISIBLE])
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as error:
        log.warning("nvidia-smi -L failed (%s); assuming no GPU", error)
        return []
    return parse_nvidia_smi(listing)


def _parse_visible(value: str) -> list[str]:
    gpus = []
    for entry in (part.strip() for part in value.split(",")):
        if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
            break
        gpus.append(entry)
    return gpus


def parse_nvidia_smi(listing: str) -> list[str]:
    """``nvidia-smi -L`` output as ``CUDA_VISIBLE_DEVICES`` entries.

    Lines ``GPU 0: NAME (UUID: GPU-...)`` give indices; indented ``MIG ... (UUID: MIG-...)``
    lines under a GPU give its instances, which take the GPU's place (CUDA runs a
    process on one MIG instance, addressed by its UUID).
    """
    gpus: list[str] = []
    instances: dict[str, list[str]] = {}
    current = None
    for line in listing.splitlines():
        text = line.strip()
        if text.startswith("GPU ") and ":" in text:
            current = text[4 : text.index(":")].strip()
            if current.isdigit():
                gpus.append(current)
            else:
                current = None
        elif text.startswith("MIG ") and current is not None and "UUID: " in text:
            uuid = text.split("UUID: ", 1)[1].rstrip(")").strip()
            instances.setdefault(current, []).append(uuid)
    return [entry for gpu in gpus for entry in instances.get(gpu, [gpu])]


def worker_plan(gpus: list[str], base_env: Mapping[str, str]) -> list[dict[str, str]]:
    """One environment per worker process: one per GPU, or a single one for the CPU.

    Each GPU worker sees only its card (``CUDA_VISIBLE_DEVICES`` set to that entry, so it
    is ``cuda:0`` inside the worker) and runs on it (``CLASSLENS_DEVICE=cuda``, so a card
    that has gone missing is an error, not a CPU worker). Without GPUs the one worker
    keeps ``base_env`` with ``CLASSLENS_DEVICE=cpu``, unless ``base_env`` asks for CUDA,
    in which case it stays, so that the worker fails with :class:`DeviceError`'s message.
    """
    if not gpus:
        env = dict(base_env)
        if env.get("CLASSLENS_DEVICE", "auto").lower() != "cuda":
            env["CLASSLENS_DEVICE"] = "cpu"
        return [env]
    return [{**base_env, VISIBLE: gpu, "CLASSLENS_DEVICE": "cuda"} for gpu in gpus]
