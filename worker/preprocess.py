"""Turn a decoded image into the network's input tensor, as the manifest says."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from model_store.manifest import InputSpec, Preprocessing

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


def fit_to_input(image: Image.Image, spec: InputSpec, steps: Preprocessing) -> Image.Image:
    """Colour mode, resize and centre crop: the picture the network sees."""
    image = image.convert(spec.colour_mode)
    height, width = steps.resize
    if image.size != (width, height):
        image = image.resize((width, height), _RESAMPLE[steps.interpolation])
    if steps.crop is not None:
        crop_h, crop_w = steps.crop
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        image = image.crop((left, top, left + crop_w, top + crop_h))
    return image


def preprocess(image: Image.Image, spec: InputSpec, steps: Preprocessing) -> torch.Tensor:
    """:func:`fit_to_input`, then scale to [0, 1] and normalise: ``float32 [C, H, W]``."""
    image = fit_to_input(image, spec, steps)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    tensor = torch.from_numpy(pixels.transpose(2, 0, 1).copy())
    mean = torch.tensor(steps.mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(steps.std, dtype=torch.float32)[:, None, None]
    return (tensor - mean) / std
