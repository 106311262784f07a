"""Turn a decoded image into the network's input tensor, as the manifest says."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from classlens.core.images import fit_to_input
from model_store.manifest import InputSpec, Preprocessing


def preprocess(image: Image.Image, spec: InputSpec, steps: Preprocessing) -> torch.Tensor:
    """:func:`fit_to_input`, then scale to [0, 1] and normalise: ``float32 [C, H, W]``.

    The arithmetic is torchvision's ``ToTensor`` then ``Normalize`` (timm's eval transform ends
    with them): uint8 to float32 divided by 255, then ``(x - mean) / std`` in float32, so the
    tensor equals theirs bit for bit (tests/test_preprocessing.py).
    """
    image = fit_to_input(image, spec, steps)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    tensor = torch.from_numpy(pixels.transpose(2, 0, 1).copy())
    mean = torch.tensor(steps.mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(steps.std, dtype=torch.float32)[:, None, None]
    return (tensor - mean) / std
