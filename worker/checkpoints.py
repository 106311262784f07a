"""Reading the weights people have into one plain state dict, without ever running code from the file.

A safetensors file is read as it is. A pickle-based file (``.pth``, ``.pt``, ``.bin``,
``.pth.tar``) is read only with ``torch.load(weights_only=True)``
(:func:`worker.model_loader.read_checkpoint`, which also admits the ``argparse.Namespace``
of timm's ``train.py`` checkpoints), then unwrapped: the state dict of a training
checkpoint (``state_dict``, ``state_dict_ema`` when asked, ``model``, ...), and a prefix
every key shares because the model was saved wrapped (DDP's ``module.``,
``torch.compile``'s ``_orig_mod.``) removed. Whatever is wrong with the file is a
:class:`~model_store.sources.RegistrationError` that names it.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from model_store.sources import RegistrationError, weights_suffix
from worker.model_loader import read_checkpoint

# Wrappers that put a prefix before every key: DistributedDataParallel / DataParallel
# ("module.") and torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Where training scripts keep the weights inside a checkpoint dict, most specific first.
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "module")


@dataclass
class Weights:
    """The plain state dict read from the weights file, and what was done to get it."""

    state: dict[str, torch.Tensor]
    kind: str  # "safetensors file", "state dict", "timm train.py checkpoint", ...
    file: str = ""  # the file's name, for messages
    entry: str | None = None  # the checkpoint key the weights came from ("state_dict_ema", ...)
    arch: str | None = None  # a train.py checkpoint's architecture
    args: dict[str, Any] = field(default_factory=dict)  # a train.py checkpoint's arguments
    epoch: int | None = None
    removed: list[str] = field(default_factory=list)  # wrapper prefixes removed from every key

    @property
    def plain(self) -> bool:
        """Whether the file already is what gets stored (a safetensors file with nothing removed)."""
        return self.kind == "safetensors file" and not self.removed


def read_weights(path: Path, *, ema: bool) -> Weights:
    """The plain state dict in ``path``: safetensors as it is, a pickle-based checkpoint unwrapped.

    A pickle-based file is only ever read with ``weights_only=True`` (plus the ``argparse.Namespace``
    of timm's train.py checkpoints, see :func:`worker.model_loader.read_checkpoint`).
    """
    if weights_suffix(path.name) == ".safetensors":
        try:
            state = load_file(str(path), device="cpu")
        except Exception as error:  # SafetensorError, OSError, ...: whatever a malformed file raises
            raise RegistrationError(f"{path.name}: not a readable safetensors file: {error}") from None
        if ema:
            raise RegistrationError(
                f"EMA weights were asked for, but {path.name} is a safetensors file, which holds one set of weights; "
                "EMA weights come from a timm train.py checkpoint (.pth.tar) that has a state_dict_ema"
            )
        weights = Weights(state=state, kind="safetensors file")
    else:
        weights = _unwrap(path.name, _unpickle(path), ema=ema)
    weights.state, weights.removed = _strip_wrappers(weights.state)
    weights.file = path.name
    if not weights.state:
        raise RegistrationError(f"{path.name}: holds no tensors")
    return weights


def _unpickle(path: Path) -> object:
    try:
        return read_checkpoint(path)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f"a {found.group(1)} object" if found else "objects other than tensors and plain values"
        raise RegistrationError(
            f"{path.name}: refused to unpickle: it holds {what}, and PyTorch checkpoints are read with "
            "torch.load(weights_only=True), which runs no code from the file (only tensors, plain values and "
            "timm's argparse.Namespace are accepted). Save the state dict alone (torch.save(model.state_dict(), ...)) "
            "or as safetensors"
        ) from None
    except Exception as error:  # torch.load raises many kinds of error for a file that is not a checkpoint
        raise RegistrationError(f"{path.name}: not a PyTorch checkpoint torch can read: {error}") from None


def _unwrap(name: str, content: object, *, ema: bool) -> Weights:
    """The state dict of a checkpoint: a dict of tensors, or one kept under ``state_dict`` (timm), ``model``, ..."""
    if not isinstance(content, dict):
        raise RegistrationError(f"{name}: holds a {type(content).__name__}, not a state dict (a dict of tensors)")
    if content and all(isinstance(v, torch.Tensor) for v in content.values()):
        if ema:
            raise RegistrationError(
                f"EMA weights were asked for, but {name} is a plain state dict with one set of weights; "
                "EMA weights come from a timm train.py checkpoint that has a state_dict_ema"
            )
        return Weights(state=dict(content), kind="state dict")
    keys = ", ".join(str(k) for k in list(content)[:8])
    if ema:
        if not isinstance(content.get("state_dict_ema"), dict):
            raise RegistrationError(
                f"EMA weights were asked for, but {name} has no state_dict_ema (it holds {keys}): "
                "it was saved without --model-ema; register it without EMA to take its state_dict"
            )
        entry = "state_dict_ema"
    else:
        found = next((key for key in STATE_DICT_KEYS if isinstance(content.get(key), dict)), None)
        if found is None:
            raise RegistrationError(
                f"{name}: no state dict in the checkpoint (it holds {keys}; looked for {', '.join(STATE_DICT_KEYS)})"
            )
        entry = found
    state = content[entry]
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise RegistrationError(f"{name}: {entry}[{bad!r}] is a {type(state[bad]).__name__}, not a tensor")
    args = content.get("args")
    arguments = dict(args) if isinstance(args, dict) else dict(vars(args)) if hasattr(args, "__dict__") else {}
    timm_checkpoint = entry.startswith("state_dict") and ("arch" in content or "args" in content)
    return Weights(
        state=dict(state),
        kind="timm train.py checkpoint" if timm_checkpoint else "checkpoint",
        entry=entry,
        arch=content.get("arch") if isinstance(content.get("arch"), str) else None,
        args=arguments,
        epoch=content.get("epoch") if isinstance(content.get("epoch"), int) else None,
    )


def _strip_wrappers(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state`` with a prefix every key shares removed, while it is a known wrapper's (``module.``, ...)."""
    removed = []
    while state:
        prefix = next((p for p in WRAPPER_PREFIXES if all(key.startswith(p) for key in state)), None)
        if prefix is None:
            break
        state = {key[len(prefix) :]: value for key, value in state.items()}
        removed.append(prefix)
    return state, removed
