"""`encode_png`: any PNG decoder reads back the exact pixels, whatever the mode, size, level or
number of deflate strips; the zlib stream is one valid stream over the filtered rows."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from bagel_ray import png
from bagel_ray.png import encode_png, filtered_rows


def _decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data), formats=["PNG"])
    image.load()
    return image


def _idat(data: bytes) -> bytes:
    pos, out = 8, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            out += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    return out


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
@pytest.mark.parametrize("size", [(1, 1), (7, 3), (64, 48), (300, 700)])
def test_the_pixels_come_back_exactly(mode, size):
    rng = np.random.default_rng(sum(size))
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    shape = (size[1], size[0], channels) if channels > 1 else (size[1], size[0])
    image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
    back = _decoded(encode_png(image))
    assert back.mode == mode and back.size == size
    assert np.array_equal(np.asarray(back), np.asarray(image))


def test_many_strips_make_one_zlib_stream_of_the_filtered_rows(monkeypatch):
    """Strips deflated apart (here 100+, each a few rows) join into a stream that zlib itself
    checks end to end (its Adler-32 included)."""
    monkeypatch.setattr(png, "_STRIP_BYTES", 1000)
    yy, xx = np.mgrid[0:240, 0:320]
    pixels = np.stack([xx % 256, yy % 256, (xx * yy) % 256], -1).astype(np.uint8)
    data = encode_png(Image.fromarray(pixels), level=9)
    assert zlib.decompress(_idat(data)) == filtered_rows(pixels).tobytes()
    assert np.array_equal(np.asarray(_decoded(data)), pixels)


@pytest.mark.parametrize("level", [0, 1, 6, 9])
def test_every_level_is_lossless(level):
    image = Image.fromarray(np.random.default_rng(level).integers(0, 256, (90, 130, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(_decoded(encode_png(image, level))), np.asarray(image))


def test_other_modes_are_stored_as_rgb_or_rgba():
    palette = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).convert("P")
    assert _decoded(encode_png(palette)).mode == "RGB"
    assert np.array_equal(np.asarray(_decoded(encode_png(palette))), np.asarray(palette.convert("RGB")))
    with_alpha = Image.new("LA", (5, 5), (100, 50))
    assert _decoded(encode_png(with_alpha)).mode == "RGBA"


def test_a_smooth_image_compresses():
    yy, xx = np.mgrid[0:256, 0:256]
    image = Image.fromarray(np.stack([xx, yy, (xx + yy) // 2], -1).astype(np.uint8))
    assert len(encode_png(image)) < 256 * 256 * 3 // 20
