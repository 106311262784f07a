"""Image decoding in the API, a bounded number at a time, so its memory has a ceiling whatever the uploads.

An image of ``max_image_pixels`` decodes to up to 4 bytes a pixel (RGBA, CMYK, 32-bit modes):
160 MB at the default 40 megapixels. Eight clients uploading such images at once took the API
from 321 MB to 1.3 GB. Every decode therefore takes one of ``api_max_concurrent_decodes``
slots (:class:`DecodeSlots`); a request that finds none free waits up to ``api_decode_wait_s``,
then is refused with a 503 ``busy`` rather than held without bound.
docs/service-design.md ("Limits") gives the ceiling's arithmetic.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from flask import current_app

from classlens.core.images import decode_image
from classlens.core.settings import Settings
from service.errors import Problem

_T = TypeVar("_T")
BYTES_PER_PIXEL = 4  # the widest mode Pillow decodes these formats to
_EXTENSION = "classlens.decode_slots"


class DecodeSlots:
    """At most ``size`` holders at once; :meth:`hold` waits ``wait_s`` for a turn, then raises a 503 Problem."""

    def __init__(self, size: int, wait_s: float):
        self.size, self.wait_s = size, wait_s
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self.active = 0
        self.most_active = 0  # the highest number of holders seen at once (for tests and operators)

    @contextmanager
    def hold(self) -> Iterator[None]:
        if not self._slots.acquire(timeout=self.wait_s):
            raise Problem(
                503,
                "Too busy to decode",
                f"{self.size} images are being decoded and none finished within {self.wait_s:g} s; try again",
                problem="busy",
                headers={"Retry-After": "1"},
            )
        try:
            with self._lock:
                self.active += 1
                self.most_active = max(self.most_active, self.active)
            yield
        finally:
            with self._lock:
                self.active -= 1
            self._slots.release()


def slots() -> DecodeSlots:
    """The current app's slots, made on first use from its settings (one set per app)."""
    extensions = current_app.extensions
    found = extensions.get(_EXTENSION)
    if found is None:
        settings: Settings = extensions["classlens"].settings
        found = extensions.setdefault(
            _EXTENSION, DecodeSlots(settings.api_max_concurrent_decodes, settings.api_decode_wait_s)
        )
    return found


def check_decodable(data: bytes, max_pixels: int) -> None:
    """Decode ``data`` once, in a slot, and drop the pixels; :class:`ImageError` if it is no usable image."""
    with slots().hold():
        decode_image(data, max_pixels=max_pixels)


def with_decoded(data: bytes, max_pixels: int, use: Callable[..., _T]) -> _T:
    """``use(image)`` on the decoded ``data``, all inside one slot (the pixels live no longer than the slot)."""
    with slots().hold():
        return use(decode_image(data, max_pixels=max_pixels))
