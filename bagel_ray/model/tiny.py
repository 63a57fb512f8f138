"""The embedded default model: a tiny random BAGEL checkpoint in the official layout.

It has the geometry of the golden `bagel-tiny` fixture (a 2-layer 64-wide MoT LLM, a 2-layer
SigLIP, a 32-channel FLUX VAE, images up to 128 px), so the CLI, `serve run` and the tests
run on a CPU in seconds with no downloads, through the same loader as the real checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from bagel_ray.model.config import BagelConfig, LLMConfig, ResizeConfig, VAEConfig, ViTConfig
from bagel_ray.model.loader import AE_FILE, EMA_FILE, checkpoint_layout
from bagel_ray.model.tiny_tokenizer import write_tiny_tokenizer
from bagel_ray.model.vae import AutoEncoder

TINY_VERSION = 1
BPE_TOKENS = 1000
TINY_CONFIG = BagelConfig(
    llm=LLMConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024),
    vit=ViTConfig(hidden_size=48, intermediate_size=96, num_layers=2, num_attention_heads=4, patch_size=14),
    vae=VAEConfig(ch=32, ch_mult=(1, 1, 2, 2)),
    vae_transform=ResizeConfig(128, 64, 16),
    vit_transform=ResizeConfig(112, 56, 14),
    max_latent_size=8,
    vit_max_num_patch_per_side=8,
)


def sincos_table(grid: int, dim: int) -> torch.Tensor:
    """The 2-D sin-cos table of spec 5.5: row i*G+j is [S(j), S(i)], S(u) = [sin(u w), cos(u w)]."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)

    def s(u: torch.Tensor) -> torch.Tensor:
        angles = u[:, None] * omega[None]
        return torch.cat((angles.sin(), angles.cos()), dim=1)

    rows = coords.repeat_interleave(grid)
    cols = coords.repeat(grid)
    return torch.cat((s(cols), s(rows)), dim=1).float()


def _random_ema(cfg: BagelConfig, vocab_len: int, eos_id: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    tensors = {}
    for key, shape in checkpoint_layout(cfg).items():
        if key.endswith("pos_embed"):
            t = sincos_table(math.isqrt(shape[0]), shape[1])
        elif len(shape) == 1 and ("norm" in key and key.endswith("weight")):
            t = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif len(shape) == 1:
            t = 0.02 * torch.randn(shape, generator=generator)
        else:
            t = torch.randn(shape, generator=generator) / math.sqrt(shape[-1])
        tensors[key] = t
    # Keep greedy text printable: padded ids and special tokens other than <|im_end|> never win.
    head = tensors["language_model.lm_head.weight"]
    head[BPE_TOKENS:] = 0
    head[eos_id] = torch.randn(head.shape[1], generator=generator) / math.sqrt(head.shape[1])
    head[vocab_len:] = 0
    return {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}


def make_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Write the tiny checkpoint into `folder` (created if needed); same bytes for a seed."""
    from bagel_ray.model.tokenizer import BagelTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = TINY_CONFIG
    write_tiny_tokenizer(folder, vocab_size=BPE_TOKENS)
    tok = BagelTokenizer.from_folder(folder)
    generator = torch.Generator().manual_seed(seed)
    save_file(_random_ema(cfg, tok.vocab_len, tok.eos_id, generator), str(folder / EMA_FILE))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = AutoEncoder(cfg.vae)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(folder / AE_FILE))
    llm, vit, vae_cfg = cfg.llm, cfg.vit, cfg.vae
    llm_json = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "hidden_size": llm.hidden_size, "intermediate_size": llm.intermediate_size,
        "num_hidden_layers": llm.num_hidden_layers, "num_attention_heads": llm.num_attention_heads,
        "num_key_value_heads": llm.num_key_value_heads, "vocab_size": llm.vocab_size,
        "rms_norm_eps": llm.rms_norm_eps, "rope_theta": llm.rope_theta, "rope_scaling": None,
        "max_position_embeddings": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": BPE_TOKENS, "eos_token_id": tok.eos_id,
    }
    vit_json = {
        "model_type": "siglip_vision_model", "hidden_size": vit.hidden_size, "intermediate_size": vit.intermediate_size,
        "num_attention_heads": vit.num_attention_heads, "num_hidden_layers": vit.num_layers + 1,
        "patch_size": vit.patch_size, "image_size": cfg.vit_max_num_patch_per_side * vit.patch_size,
    }
    files = {
        "llm_config.json": llm_json,
        "vit_config.json": vit_json,
        "ae_config.json": {**vae_cfg.__dict__, "ch_mult": list(vae_cfg.ch_mult)},
        "image_transforms.json": {
            "vae": {"max_image_size": cfg.vae_transform.max_image_size, "min_image_size": cfg.vae_transform.min_image_size,
                    "image_stride": cfg.vae_transform.image_stride},
            "vit": {"max_image_size": cfg.vit_transform.max_image_size, "min_image_size": cfg.vit_transform.min_image_size,
                    "image_stride": cfg.vit_transform.image_stride},
            "official_defaults": {"vae": [1024, 512, 16], "vit": [980, 224, 14]},
        },
        # Like the hub's, this config.json is not read by the loader, and its max_latent_size
        # is stale on purpose (half the true value, as the real checkpoint's 32 for 64).
        "config.json": {
            "architectures": ["BagelForConditionalGeneration"], "model_type": "bagel",
            "llm_config": llm_json, "vit_config": vit_json,
            "vae_config": {"downsample": vae_cfg.downsample, "z_channels": vae_cfg.z_channels},
            "latent_patch_size": cfg.latent_patch_size, "max_latent_size": cfg.max_latent_size // 2,
            "vit_max_num_patch_per_side": cfg.vit_max_num_patch_per_side, "connector_act": "gelu_pytorch_tanh",
            "interpolate_pos": False, "timestep_shift": 1.0,
        },
    }
    for name, data in files.items():
        (folder / name).write_text(json.dumps(data, indent=2) + "\n")
    return folder


def tiny_model_path(cache_dir: Path | None = None) -> Path:
    """The embedded tiny checkpoint, made once in a cache folder (atomically, so concurrent
    first uses from several processes are safe)."""
    root = Path(cache_dir or os.environ.get("BAGEL_RAY_CACHE", Path.home() / ".cache" / "bagel-ray"))
    target = root / f"tiny-v{TINY_VERSION}"
    if (target / EMA_FILE).exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root))
    try:
        make_tiny_model(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / EMA_FILE).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
