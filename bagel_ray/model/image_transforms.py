"""Pixel-side helpers: the official resize rule, tensor conversion, patchify, position ids and
the latent <-> token layout (spec sections 4.1-4.3, 5.1, 5.3, 5.6, 11.13-14).

Everything here is a small pure function so that each can be checked by hand. The resize rule is
copied with its quirks (Python's half-to-even `round`, the max_pixels branch scaling by the pixel
ratio rather than its square root), because the official outputs depend on them.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from bagel_ray.model.config import ResizeConfig


def to_rgb(image: Image.Image) -> Image.Image:
    """`pil_img2rgb`: composite RGBA (or any image with a transparency entry) on white, else convert to RGB.

    Converting RGBA straight to RGB would drop alpha and keep whatever colour sits under
    transparent pixels; the reference shows those pixels as white.
    """
    if image.mode == "RGBA" or image.info.get("transparency", None) is not None:
        image = image.convert("RGBA")
        white = Image.new(mode="RGB", size=image.size, color=(255, 255, 255))
        white.paste(image, mask=image.split()[3])
        return white
    return image.convert("RGB")


def _make_divisible(value: int, stride: int) -> int:
    """Snap to the nearest multiple of `stride` (half-to-even), never below `stride`."""
    return max(stride, int(round(value / stride) * stride))


def _apply_scale(width: int, height: int, scale: float, stride: int) -> tuple[int, int]:
    return _make_divisible(round(width * scale), stride), _make_divisible(round(height * scale), stride)


def resize_size(width: int, height: int, cfg: ResizeConfig) -> tuple[int, int]:
    """Output (width, height) of `MaxLongEdgeMinShortEdgeResize` for a `width` x `height` input.

    Downscale only to fit `max_image_size`, upscale to reach `min_image_size`, snap both sides to
    `image_stride`; then shrink by the pixel ratio (not its square root, as the official code does)
    if over `max_pixels`, and finally shrink again if the long side still exceeds the maximum.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    stride = cfg.image_stride
    scale = min(cfg.max_image_size / max(width, height), 1.0)
    scale = max(scale, cfg.min_image_size / min(width, height))
    new_w, new_h = _apply_scale(width, height, scale, stride)
    if new_w * new_h > cfg.max_pixels:
        new_w, new_h = _apply_scale(new_w, new_h, cfg.max_pixels / (new_w * new_h), stride)
    if max(new_w, new_h) > cfg.max_image_size:
        new_w, new_h = _apply_scale(new_w, new_h, cfg.max_image_size / max(new_w, new_h), stride)
    return new_w, new_h


def resize(image: Image.Image, cfg: ResizeConfig) -> Image.Image:
    """Resize per `resize_size` with PIL bicubic (antialiased), which is what torchvision's
    `F.resize(..., BICUBIC, antialias=True)` runs on a PIL image. Unchanged sizes return the input."""
    size = resize_size(image.width, image.height, cfg)
    if size == image.size:
        return image
    return image.resize(size, Image.BICUBIC)


def to_tensor(image: Image.Image) -> Tensor:
    """RGB PIL image -> float32 [3, H, W] in [-1, 1]: `ToTensor` (x/255) then `Normalize(0.5, 0.5)`,
    in the same operation order so the values match bit for bit."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image (use to_rgb first), got mode {image.mode!r}")
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
    return pixels.to(torch.float32).div(255).sub(0.5).div(0.5)


def vit_patchify(image: Tensor, patch: int) -> Tensor:
    """[C, H, W] -> [(H/p)*(W/p), p*p*C]: tokens row-major over the patch grid, each vector ordered
    (py, px, c) with the channel fastest (matches the checkpoint's linear patch embedding)."""
    c, h, w = image.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not a multiple of the patch size {patch}")
    grid = image.reshape(c, h // patch, patch, w // patch, patch).permute(1, 3, 2, 4, 0)
    return grid.reshape(-1, patch * patch * c)


def grid_position_ids(h: int, w: int, max_per_side: int) -> Tensor:
    """Flattened ids `r * max_per_side + c` of an h x w patch grid, row-major: the top-left
    sub-grid of the position table ("extrapolate" rule, spec 4.3)."""
    if h > max_per_side or w > max_per_side:
        raise ValueError(f"grid {h}x{w} exceeds the position table's {max_per_side} per side")
    rows = torch.arange(h, dtype=torch.long)
    cols = torch.arange(w, dtype=torch.long)
    return (rows[:, None] * max_per_side + cols).flatten()


def latent_to_tokens(latent: Tensor, patch: int = 2) -> Tensor:
    """VAE latent [1, C, 2h, 2w] (or [C, 2h, 2w]) -> tokens [h*w, p*p*C], ordered (py, px, c).

    Trailing rows/columns that do not fill a whole patch are dropped, as the official slice does.
    """
    if latent.dim() == 4:
        if latent.shape[0] != 1:
            raise ValueError(f"expected a batch of one latent, got shape {tuple(latent.shape)}")
        latent = latent[0]
    c, hh, ww = latent.shape
    h, w = hh // patch, ww // patch
    latent = latent[:, : h * patch, : w * patch]
    return latent.reshape(c, h, patch, w, patch).permute(1, 3, 2, 4, 0).reshape(h * w, patch * patch * c)


def tokens_to_latent(tokens: Tensor, h: int, w: int, patch: int = 2, channels: int = 16) -> Tensor:
    """Inverse of `latent_to_tokens`: tokens [h*w, p*p*C] -> latent [1, C, h*p, w*p]."""
    if tuple(tokens.shape) != (h * w, patch * patch * channels):
        raise ValueError(f"tokens of shape {tuple(tokens.shape)} do not fit a {h}x{w} grid of {patch * patch * channels}-dim tokens")
    latent = tokens.reshape(1, h, w, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return latent.reshape(1, channels, h * patch, w * patch)


def decoded_to_uint8(decoded: Tensor) -> Tensor:
    """Decoder output [1, 3, H, W] -> uint8 [H, W, 3] via `(x*0.5+0.5).clamp(0,1)*255`, then a cast
    that TRUNCATES (no rounding), as the reference does."""
    if decoded.dim() != 4 or decoded.shape[0] != 1:
        raise ValueError(f"expected a decoded image of shape [1, 3, H, W], got {tuple(decoded.shape)}")
    image = (decoded * 0.5 + 0.5).clamp(0, 1)[0].permute(1, 2, 0) * 255
    return image.to(torch.uint8)


def decoded_to_pil(decoded: Tensor) -> Image.Image:
    """Decoder output [1, 3, H, W] -> RGB PIL image (see `decoded_to_uint8`)."""
    return Image.fromarray(decoded_to_uint8(decoded).cpu().numpy())
