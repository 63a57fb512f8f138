"""PNG encoding with the deflate spread over threads.

Every image response is a PNG encoded after the last GPU step, so its encoding adds straight to
the request's latency: PIL takes 28-70 ms for a 512² image with fine texture (random-weight
outputs, detailed photos) at zlib level 1, on one thread, most of it in choosing a filter per
row and in deflate. Here every row but the first takes PNG's "Up" filter (the difference to the
row above, one vectorised subtraction: on test images within 2 % of the size that the per-row
best filter gives, which costs ~17 ms to choose), and horizontal strips of the filtered rows are
deflated on a thread pool (zlib lets go of the GIL) into one zlib stream: each strip but the
last ends on a sync flush, so the strips' raw deflate streams concatenate, and the stream's
Adler-32 is that of all the filtered bytes. Any PNG decoder reads the result.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPES = {"L": 0, "RGB": 2, "RGBA": 6}  # PNG colour type of each PIL mode taken here
_STRIP_BYTES = 1 << 17  # ~6 strips for a 512² RGB image; each starts a fresh deflate window
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _threads() -> ThreadPoolExecutor:
    """One pool for the process, made on first use (responses are encoded from many threads)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="png")
        return _pool


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def filtered_rows(pixels: np.ndarray) -> np.ndarray:
    """[h, 1 + w*c] uint8: each row's PNG filter type byte, then its filtered bytes: the first
    row as it is (type 0), every other row minus the row above, modulo 256 (type 2, "Up")."""
    h = pixels.shape[0]
    raw = pixels.reshape(h, -1)
    out = np.empty((h, raw.shape[1] + 1), dtype=np.uint8)
    out[:, 0] = 2
    out[0, 0] = 0
    out[0, 1:] = raw[0]
    np.subtract(raw[1:], raw[:-1], out=out[1:, 1:])  # uint8: wraps modulo 256, as PNG wants
    return out


def _deflate(strip: bytes, level: int, last: bool) -> bytes:
    comp = zlib.compressobj(level, zlib.DEFLATED, -15)  # raw deflate: the zlib header is written once
    return comp.compress(strip) + comp.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


def encode_png(image: Image.Image, level: int = 1) -> bytes:
    """The image as PNG bytes (8 bits a channel; L, RGB and RGBA, other modes as RGB(A))."""
    if image.mode not in _COLOR_TYPES:
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    pixels = np.asarray(image)
    h, w = pixels.shape[:2]
    rows = filtered_rows(pixels)
    data = rows.tobytes()
    per_strip = max(1, _STRIP_BYTES // rows.shape[1])
    strips = [data[i * rows.shape[1]: min(h, i + per_strip) * rows.shape[1]] for i in range(0, h, per_strip)]
    if len(strips) == 1:
        body = [_deflate(strips[0], level, True)]
    else:
        body = list(_threads().map(_deflate, strips, [level] * len(strips), [i == len(strips) - 1 for i in range(len(strips))]))
    stream = b"\x78\x01" + b"".join(body) + struct.pack(">I", zlib.adler32(data))
    header = struct.pack(">IIBBBBB", w, h, 8, _COLOR_TYPES[image.mode], 0, 0, 0)
    return _SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", stream) + _chunk(b"IEND", b"")
