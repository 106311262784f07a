import gzip

import numpy as np
import pytest

from classlens.core import fashion_mnist


def test_test_split_shapes_and_labels():
    images, labels = fashion_mnist.load("test")
    assert images.shape == (10_000, 28, 28)
    assert images.dtype == np.uint8
    assert labels.shape == (10_000,)
    assert set(np.unique(labels)) == set(range(10))
    assert len(fashion_mnist.LABELS) == 10


def test_missing_data_says_what_to_install(tmp_path):
    with pytest.raises(fashion_mnist.DatasetMissingError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.load("test", root=tmp_path)


def test_wrong_magic_is_refused(tmp_path):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        with gzip.open(tmp_path / name, "wb") as stream:
            stream.write(b"\x00\x00\x00\x01" + bytes(20))
    with pytest.raises(ValueError, match="magic"):
        fashion_mnist.load("test", root=tmp_path)
