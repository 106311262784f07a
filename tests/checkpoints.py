"""Checkpoints as users make them, written by the libraries' own save functions from small random models.

Shared by the CLI tests (``tests/test_model_formats.py``) and the service tests
(``tests/test_service_model_formats.py``). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from timm.utils import CheckpointSaver, ModelEmaV3

import worker  # noqa: F401  (torchvision compatibility before timm)
from worker.random_models import random_vit

ARCH = "vit_tiny_patch16_224"
TINY = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}
LABELS = ["cat", "dog", "bird"]


def tiny_vit(num_classes: int = 3, seed: int = 0, **extra) -> torch.nn.Module:
    return random_vit(ARCH, seed=seed, num_classes=num_classes, **{**TINY, **extra})


def train_checkpoint(folder: Path, ema: bool = True) -> tuple[torch.nn.Module, torch.nn.Module | None, Path]:
    """A checkpoint written by timm's own CheckpointSaver, as train.py writes it (with its argparse args)."""
    model = tiny_vit(num_classes=4)
    model_ema = ModelEmaV3(model) if ema else None
    with torch.no_grad():  # one "step": the model moves away from its EMA copy
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    args = argparse.Namespace(
        model=ARCH,
        num_classes=4,
        img_size=32,
        in_chans=None,
        input_size=None,
        gp=None,
        model_kwargs={k: v for k, v in TINY.items() if k != "img_size"},
        mean=None,
        std=None,
        crop_pct=None,
        interpolation="",
        lr=5e-4,
    )
    folder.mkdir(parents=True, exist_ok=True)
    saver = CheckpointSaver(
        model, torch.optim.AdamW(model.parameters()), args=args, model_ema=model_ema, checkpoint_dir=str(folder)
    )
    saver.save_checkpoint(epoch=3, metric=0.5)
    return model, None if model_ema is None else model_ema.module, folder / "last.pth.tar"


def hf_config(config_class, **extra):
    return config_class(
        image_size=32,
        patch_size=8,
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=2,
        intermediate_size=128,
        **extra,
    )
