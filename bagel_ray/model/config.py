"""Frozen configs of the BAGEL components, parsed from the official checkpoint folder.

Only the files of the official Hugging Face layout are read (`llm_config.json`,
`vit_config.json`), plus two optional extras that tiny test checkpoints carry
(`ae_config.json`, `image_transforms.json`); absent, the official values apply.
Sizes that the official code derives or hard-codes are derived here, once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class LLMConfig:
    """Qwen2 MoT language model (`llm_config.json`, with BAGEL's overrides: qk_norm, untied head)."""

    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    vocab_size: int = 152064
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json(cls, path: Path) -> "LLMConfig":
        raw = json.loads(Path(path).read_text())
        if raw.get("rope_scaling"):
            raise ValueError(f"{path}: rope_scaling={raw['rope_scaling']!r} is not supported (BAGEL uses default RoPE)")
        return cls(
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw["num_key_value_heads"],
            vocab_size=raw["vocab_size"],
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=raw.get("rope_theta", 1_000_000.0),
        )


@dataclass(frozen=True)
class ViTConfig:
    """SigLIP NaViT encoder. The official code drops the last layer: `num_layers` is
    `num_hidden_layers - 1` of `vit_config.json` (27 -> 26 for the real model)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 26
    num_attention_heads: int = 16
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.num_channels

    @classmethod
    def from_json(cls, path: Path) -> "ViTConfig":
        raw = json.loads(Path(path).read_text())
        return cls(
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"] - 1,
            num_attention_heads=raw["num_attention_heads"],
            patch_size=raw["patch_size"],
            num_channels=raw.get("num_channels", 3),
            layer_norm_eps=raw.get("layer_norm_eps", 1e-6),
        )


@dataclass(frozen=True)
class VAEConfig:
    """FLUX.1 autoencoder geometry; the official `load_ae` hard-codes these values."""

    resolution: int = 256
    in_channels: int = 3
    downsample: int = 8
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    @classmethod
    def from_json(cls, path: Path) -> "VAEConfig":
        raw = json.loads(Path(path).read_text())
        raw["ch_mult"] = tuple(raw["ch_mult"])
        return cls(**raw)


@dataclass(frozen=True)
class ResizeConfig:
    """`ImageTransform(max_image_size, min_image_size, image_stride)` of the official code."""

    max_image_size: int
    min_image_size: int
    image_stride: int
    max_pixels: int = 14 * 14 * 9 * 1024


@dataclass(frozen=True)
class BagelConfig:
    """Everything the model and engines need to know about one checkpoint."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    vit: ViTConfig = field(default_factory=ViTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    vae_transform: ResizeConfig = field(default_factory=lambda: ResizeConfig(1024, 512, 16))
    vit_transform: ResizeConfig = field(default_factory=lambda: ResizeConfig(980, 224, 14))
    latent_patch_size: int = 2
    # The real hub config.json says 32, which is stale; the weights need 64. We take it
    # from the `latent_pos_embed` table's shape in the checkpoint (see loader).
    max_latent_size: int = 64
    vit_max_num_patch_per_side: int = 70
    timestep_embed_dim: int = 256

    @property
    def latent_channels(self) -> int:
        return self.vae.z_channels

    @property
    def latent_downsample(self) -> int:
        """Pixels per latent token side (16 for the real model)."""
        return self.vae.downsample * self.latent_patch_size

    @property
    def patch_latent_dim(self) -> int:
        return self.latent_patch_size**2 * self.vae.z_channels

    @property
    def max_image_side(self) -> int:
        return self.max_latent_size * self.latent_downsample


def _read_resize_configs(folder: Path) -> tuple[ResizeConfig, ResizeConfig]:
    path = folder / "image_transforms.json"
    if not path.exists():
        return ResizeConfig(1024, 512, 16), ResizeConfig(980, 224, 14)
    raw = json.loads(path.read_text())
    return (
        ResizeConfig(raw["vae"]["max_image_size"], raw["vae"]["min_image_size"], raw["vae"]["image_stride"]),
        ResizeConfig(raw["vit"]["max_image_size"], raw["vit"]["min_image_size"], raw["vit"]["image_stride"]),
    )


def read_bagel_config(folder: Path, max_latent_size: int, vit_max_num_patch_per_side: int) -> BagelConfig:
    """Build the config of a checkpoint folder. The two table sizes come from the
    checkpoint's tensor shapes, never from the (stale) `config.json`."""
    folder = Path(folder)
    vae_json = folder / "ae_config.json"
    vae_transform, vit_transform = _read_resize_configs(folder)
    return BagelConfig(
        llm=LLMConfig.from_json(folder / "llm_config.json"),
        vit=ViTConfig.from_json(folder / "vit_config.json"),
        vae=VAEConfig.from_json(vae_json) if vae_json.exists() else VAEConfig(),
        vae_transform=vae_transform,
        vit_transform=vit_transform,
        max_latent_size=max_latent_size,
        vit_max_num_patch_per_side=vit_max_num_patch_per_side,
    )
