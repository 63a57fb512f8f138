"""Files that appear whole or not at all: written to a hidden sibling, flushed to disk, then
renamed over the final name (a rename within one folder is atomic on POSIX)."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from bagel_ray.png import encode_png


def temp_path(final: Path) -> Path:
    """A hidden sibling of `final` for writing before an atomic `os.replace`."""
    return final.with_name(f".{final.name}.{os.getpid()}.tmp")


def write_bytes(path: Path, data: bytes) -> None:
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def png_bytes(image: Image.Image) -> bytes:
    return encode_png(image, level=6)


def save_png(image: Image.Image, path: Path) -> None:
    write_bytes(path, png_bytes(image))
