"""Image preprocessing and latent layout: hand-checkable cases from the spec (4.1-4.3, 5.3, 5.6)
plus parity with the official preprocessing tensors of the tiny golden cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bagel_ray.model.config import ResizeConfig, _read_resize_configs
from bagel_ray.model.image_transforms import (
    decoded_to_pil,
    decoded_to_uint8,
    grid_position_ids,
    latent_to_tokens,
    resize,
    resize_size,
    to_rgb,
    to_tensor,
    tokens_to_latent,
    vit_patchify,
)
from tests.golden import assert_matches, load_case_tensors

OFFICIAL_VAE = ResizeConfig(1024, 512, 16)
OFFICIAL_VIT = ResizeConfig(980, 224, 14)
IMAGE_CASES = ["text2img", "img2img", "text2img_app", "text2img_variant", "text2img_think"]
# Tiny golden model: both position tables have 8 rows per side (manifest model.bagel).
TINY_MAX_PER_SIDE = 8


# ---------------------------------------------------------------- resize_size, by hand


def test_resize_size_official_vae_landscape() -> None:
    # scale = 1024/1920; 1080*scale = 576 = 36*16.
    assert resize_size(1920, 1080, OFFICIAL_VAE) == (1024, 576)


def test_resize_size_official_vit_landscape() -> None:
    # scale = 980/1920; 1080*scale = 551.25 -> 551 -> 551/14 = 39.36 -> 39*14 = 546.
    assert resize_size(1920, 1080, OFFICIAL_VIT) == (980, 546)


def test_resize_size_upscales_tiny_input_to_min_size() -> None:
    # scale = max(min(1024/20, 1), 512/10) = 51.2; the ViT rule gives 22.4.
    assert resize_size(20, 10, OFFICIAL_VAE) == (1024, 512)
    assert resize_size(20, 10, OFFICIAL_VIT) == (448, 224)


def test_resize_size_max_pixels_scales_by_pixel_ratio_not_its_sqrt() -> None:
    # 1000x1000 = 1e6 pixels > 250_000: the factor is 0.25 (a sqrt would give 0.5 -> 500x500).
    cfg = ResizeConfig(1000, 100, 10, max_pixels=250_000)
    assert resize_size(1000, 1000, cfg) == (250, 250)


def test_resize_size_max_pixels_then_max_size_with_official_vit() -> None:
    # scale = max(980/20000, 224/500) = 0.448 -> (8960, 224): 2_007_040 pixels > 1_806_336.
    # Pixel ratio 0.9 -> (8064.0, 201.6) -> (8064, 196). Long side 8064 > 980:
    # scale 980/8064 -> (980.0, 23.82) -> 24 -> 24/14 = 1.71 -> 28.
    assert resize_size(20000, 500, OFFICIAL_VIT) == (980, 28)


def test_resize_size_final_max_size_branch() -> None:
    # Upscaling the short side to 512 pushes the long side to 2048 > 1024, so the last branch
    # halves both: (2048, 512) -> (1024, 256), under min_size, as the official code does.
    assert resize_size(4000, 1000, OFFICIAL_VAE) == (1024, 256)


def test_resize_size_rounds_half_to_even() -> None:
    # No scaling (scale 1). 40/16 = 2.5 -> 2 -> 32, and 56/16 = 3.5 -> 4 -> 64.
    assert resize_size(40, 56, ResizeConfig(1024, 16, 16)) == (32, 64)


def test_resize_size_snapping_can_overshoot_max_size() -> None:
    # 110/16 = 6.875 -> 112 > 110; the final branch rescales to 110 which snaps back to 112.
    assert resize_size(200, 100, ResizeConfig(110, 16, 16)) == (112, 48)


def test_resize_returns_input_when_size_is_unchanged() -> None:
    image = Image.new("RGB", (64, 64), (1, 2, 3))
    assert resize(image, ResizeConfig(128, 64, 16)) is image


# ---------------------------------------------------------------- small pure functions, by hand


def test_to_rgb_composites_rgba_on_white() -> None:
    image = Image.new("RGBA", (2, 1))
    image.putpixel((0, 0), (255, 0, 0, 255))  # opaque red stays red
    image.putpixel((1, 0), (0, 255, 0, 0))  # transparent green becomes white
    out = to_rgb(image)
    assert out.mode == "RGB"
    assert [out.getpixel((0, 0)), out.getpixel((1, 0))] == [(255, 0, 0), (255, 255, 255)]


def test_to_rgb_palette_with_transparency_and_plain_modes() -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 255, 10, 20, 30] + [0] * (256 * 3 - 6))
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0  # palette index 0 is transparent
    out = to_rgb(image)
    assert [out.getpixel((0, 0)), out.getpixel((1, 0))] == [(255, 255, 255), (10, 20, 30)]
    assert to_rgb(Image.new("L", (1, 1), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_to_tensor_maps_uint8_to_minus_one_one() -> None:
    image = Image.new("RGB", (2, 1))
    image.putpixel((0, 0), (0, 255, 51))
    image.putpixel((1, 0), (255, 0, 0))
    x = to_tensor(image)
    assert x.shape == (3, 1, 2) and x.dtype == torch.float32
    assert x[:, 0, 0].tolist() == pytest.approx([-1.0, 1.0, 51 / 255 * 2 - 1])
    assert x[:, 0, 1].tolist() == [1.0, -1.0, -1.0]


def test_vit_patchify_orders_rows_then_pixels_then_channels() -> None:
    image = torch.arange(3 * 4 * 6, dtype=torch.float32).reshape(3, 4, 6)
    patches = vit_patchify(image, 2)
    assert patches.shape == (2 * 3, 2 * 2 * 3)
    # Token 4 is patch row 1, column 1; inside it (py, px, c) with c fastest.
    r, c = 1, 1
    expected = [image[ch, 2 * r + py, 2 * c + px].item() for py in range(2) for px in range(2) for ch in range(3)]
    assert patches[4].tolist() == expected


def test_grid_position_ids() -> None:
    assert grid_position_ids(2, 3, 70).tolist() == [0, 1, 2, 70, 71, 72]
    assert grid_position_ids(1, 1, 64).tolist() == [0]


def test_latent_tokens_layout_and_round_trip() -> None:
    h, w = 2, 3
    latent = torch.randn(1, 16, 2 * h, 2 * w, generator=torch.Generator().manual_seed(0))
    tokens = latent_to_tokens(latent)
    assert tokens.shape == (h * w, 64)
    # Token r*w+c, entry (py*2+px)*16+ch is latent[0, ch, 2r+py, 2c+px].
    r, c, py, px, ch = 1, 2, 1, 0, 5
    assert tokens[r * w + c, (py * 2 + px) * 16 + ch] == latent[0, ch, 2 * r + py, 2 * c + px]
    assert torch.equal(tokens_to_latent(tokens, h, w), latent)
    assert torch.equal(latent_to_tokens(latent[0]), tokens)


def test_latent_to_tokens_drops_partial_patches() -> None:
    latent = torch.randn(1, 16, 5, 4)
    assert torch.equal(latent_to_tokens(latent), latent_to_tokens(latent[:, :, :4, :4]))


def test_decoded_to_uint8_truncates() -> None:
    # 0.0 -> 127.5 -> 127 (a rounding conversion would give 128); out-of-range values clamp.
    decoded = torch.tensor([-2.0, -1.0, 0.0, 0.99, 1.0, 3.0]).reshape(1, 3, 1, 2)
    out = decoded_to_uint8(decoded)
    assert out.shape == (1, 2, 3) and out.dtype == torch.uint8
    # Channel-major input [[-2,-1],[0,0.99],[1,3]] becomes pixels (c0, c1, c2).
    assert out[0].tolist() == [[0, 127, 255], [0, 253, 255]]
    assert np.array_equal(np.array(decoded_to_pil(decoded)), out.numpy())


# ---------------------------------------------------------------- golden parity


def _input_image(golden_dir: Path) -> Image.Image:
    return to_rgb(Image.open(golden_dir / "cases" / "input_image.png"))


def _uint8(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image))


@pytest.fixture(scope="module")
def resize_configs(golden_model_dir: Path) -> tuple[ResizeConfig, ResizeConfig]:
    return _read_resize_configs(golden_model_dir)


@pytest.mark.parametrize("case_name", ["img2text", "img2img", "img2text_chat"])
def test_golden_vit_preprocessing(case_name: str, golden_dir: Path, manifest: dict, resize_configs) -> None:
    vae_cfg, vit_cfg = resize_configs
    case = manifest["cases"][case_name]
    specs = case["tensors"]
    golden = load_case_tensors(golden_dir, case)
    image = _input_image(golden_dir)
    # The inferencer resizes by the VAE rule first, then by the ViT rule; Bagel.chat skips the first.
    if case_name != "img2text_chat":
        image = resize(image, vae_cfg)
        assert_matches("preprocess.vae_resized_uint8", _uint8(image), golden["preprocess.vae_resized_uint8"],
                       specs["preprocess.vae_resized_uint8"]["compare"])
    vit_image = resize(image, vit_cfg)
    assert_matches("preprocess.vit_resized_uint8", _uint8(vit_image), golden["preprocess.vit_resized_uint8"],
                   specs["preprocess.vit_resized_uint8"]["compare"])

    patch = vit_cfg.image_stride
    patches = vit_patchify(to_tensor(vit_image), patch)
    assert_matches("vit.packed_pixel_patches", patches, golden["vit.packed_pixel_patches"],
                   specs["vit.packed_pixel_patches"]["compare"])
    ids = grid_position_ids(vit_image.height // patch, vit_image.width // patch, TINY_MAX_PER_SIDE)
    assert_matches("vit.position_ids", ids, golden["vit.position_ids"], specs["vit.position_ids"]["compare"])


def test_golden_vae_preprocessing(golden_dir: Path, manifest: dict, resize_configs) -> None:
    vae_cfg, _ = resize_configs
    case = manifest["cases"]["img2img"]
    specs = case["tensors"]
    golden = load_case_tensors(golden_dir, case)
    image = resize(_input_image(golden_dir), vae_cfg)
    x = to_tensor(image).unsqueeze(0)
    assert_matches("vae.input_image", x, golden["vae.input_image"], specs["vae.input_image"]["compare"])
    latent_side = 16  # pixels per latent token: 8x VAE downsample times 2x2 latent patches (spec 1.6)
    ids = grid_position_ids(image.height // latent_side, image.width // latent_side, TINY_MAX_PER_SIDE)
    assert_matches("vae.position_ids", ids, golden["vae.position_ids"], specs["vae.position_ids"]["compare"])


@pytest.mark.parametrize("case_name", IMAGE_CASES)
def test_golden_latent_layout_and_uint8(case_name: str, golden_dir: Path, manifest: dict) -> None:
    case = manifest["cases"][case_name]
    specs = case["tensors"]
    golden = load_case_tensors(golden_dir, case)
    final_latent = golden["final_latent"]
    h, w = final_latent.shape[2] // 2, final_latent.shape[3] // 2
    assert_matches("final_latent", tokens_to_latent(golden["final_latent_packed"], h, w), final_latent,
                   specs["final_latent"]["compare"])
    assert torch.equal(latent_to_tokens(final_latent), golden["final_latent_packed"])
    # From the reference's own decoded image the conversion is exact.
    assert torch.equal(decoded_to_uint8(golden["decoded_raw"]), golden["image_uint8"])
