"""Which device a worker runs on.

A CUDA context does not survive ``fork``: a child of a process that has initialised CUDA
(even only to ask ``torch.cuda.is_available()``, which initialises the driver) cannot use
the GPU. So only :func:`resolve_device`, called in the process that will run the models,
asks torch; how many workers a machine's GPUs call for is decided without torch by the
supervising command (:mod:`classlens.cli.gpu_workers`, docs/gpu.md).
"""

from __future__ import annotations

import logging
import os
from typing import Literal

import torch

log = logging.getLogger(__name__)

DeviceSetting = Literal["auto", "cpu", "cuda"]


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
        hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = f" (CUDA_VISIBLE_DEVICES={hidden!r})" if hidden is not None else ""
        build = "this torch is a CPU-only build" if torch.version.cuda is None else "torch sees no CUDA device"
        raise DeviceError(
            f"CLASSLENS_DEVICE=cuda but {build}{why}; use CLASSLENS_DEVICE=auto or cpu, "
            "or run the worker on a machine with a GPU and a CUDA build of torch"
        )
    return torch.device("cpu")
