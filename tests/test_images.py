"""Decoding untrusted image bytes: every bad input is a named, clear ImageError."""

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from classlens.core.images import ImageError, decode_image, fit_to_input
from model_store.manifest import InputSpec, Preprocessing


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noisy(size=(64, 64), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8).squeeze()
    return Image.fromarray(pixels, mode=mode)


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming a huge 1-bit image, with a tiny compressed body."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    body = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"])
def test_accepted_formats_decode_fully(fmt):
    image = decode_image(encode(noisy(), fmt))
    assert image.size == (64, 64)
    image.convert("RGB").tobytes()  # pixels are there


@pytest.mark.parametrize(
    ("data", "problem", "message"),
    [
        (b"", "empty", "0 bytes"),
        (b"GIF89a but not really", "unreadable", "not a readable image"),
        (b"%PDF-1.4 hello", "unreadable", "format is not recognised"),
    ],
)
def test_not_images(data, problem, message):
    with pytest.raises(ImageError) as error:
        decode_image(data)
    assert error.value.problem == problem
    assert message in str(error.value)


def test_truncated_image_is_named_truncated():
    data = encode(noisy((256, 256)))
    with pytest.raises(ImageError) as error:
        decode_image(data[: len(data) // 2])
    assert error.value.problem == "truncated"


def test_decompression_bomb_is_refused_before_decoding():
    bomb = png_header_only(40_000, 40_000)  # 1.6 gigapixels in about 100 bytes
    assert len(bomb) < 200
    with pytest.raises(ImageError) as error:
        decode_image(bomb)
    assert error.value.problem == "too_many_pixels"


def test_pixel_limit_is_configurable():
    data = encode(noisy((100, 100)))
    with pytest.raises(ImageError, match="100x100 = 10,000 pixels; the limit is 9,999"):
        decode_image(data, max_pixels=9_999)
    assert decode_image(data, max_pixels=10_000).size == (100, 100)


def test_unsupported_format():
    with pytest.raises(ImageError) as error:
        decode_image(encode(noisy(), "PPM"))
    assert error.value.problem == "unsupported_format"
    assert "PNG" in str(error.value)


def test_first_frame_of_an_animation():
    frames = [Image.new("L", (8, 8), color) for color in (10, 200)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    image = decode_image(buffer.getvalue())
    assert image.convert("L").getpixel((0, 0)) == 10


def test_fit_to_input_resizes_then_crops_the_centre():
    image = Image.new("RGB", (300, 200))
    image.paste((255, 0, 0), (0, 0, 150, 200))
    spec = InputSpec(height=224, width=224, channels=3, colour_mode="RGB")
    steps = Preprocessing(resize=(256, 256), crop=(224, 224), mean=(0.5,) * 3, std=(0.5,) * 3)
    fitted = fit_to_input(image.convert("RGBA"), spec, steps)
    assert fitted.size == (224, 224)
    assert fitted.mode == "RGB"
    assert fitted.getpixel((10, 112))[0] > 200
    assert fitted.getpixel((214, 112))[0] < 50
