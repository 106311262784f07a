"""Read Fashion-MNIST from the IDX files of Debian's ``dataset-fashion-mnist``.

The Debian package installs gzipped IDX files under
``/usr/share/datasets/fashion-mnist/``: images carry a 16-byte header (magic,
count, rows, columns), labels an 8-byte one (magic, count). Numpy only, so that
torch-free code (the service, tests of the store) can use it too.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Literal

import numpy as np

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
LABELS = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Pixel statistics of the 60,000 training images, scaled to [0, 1].
MEAN = 0.2860
STD = 0.3530

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IMAGE_MAGIC = 2051
_LABEL_MAGIC = 2049


class DatasetMissingError(FileNotFoundError):
    """Fashion-MNIST is not installed where we looked."""


def data_root() -> Path:
    """The folder with the IDX files: ``FASHION_MNIST_DIR`` or Debian's location."""
    return Path(os.environ.get("FASHION_MNIST_DIR", DEFAULT_ROOT))


def _read(path: Path, header: int, magic: int) -> np.ndarray:
    if not path.exists():
        raise DatasetMissingError(
            f"{path} not found: install Debian's dataset-fashion-mnist "
            "(apt-get install dataset-fashion-mnist) or set FASHION_MNIST_DIR"
        )
    with gzip.open(path, "rb") as stream:
        raw = stream.read()
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: IDX magic {found}, expected {magic}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header)


def load(split: Literal["train", "test"], root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images, labels)``: ``uint8 [n, 28, 28]`` and ``int64 [n]``."""
    folder = root or data_root()
    image_file, label_file = _FILES[split]
    images = _read(folder / image_file, 16, _IMAGE_MAGIC).reshape(-1, 28, 28)
    labels = _read(folder / label_file, 8, _LABEL_MAGIC).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
    return images, labels
