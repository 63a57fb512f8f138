"""The embedded default model: a tiny random BAGEL checkpoint in the official layout.

It has the geometry of the golden `bagel-tiny` fixture (a 2-layer 64-wide MoT LLM, a 2-layer
SigLIP, a 32-channel FLUX VAE, images up to 128 px), so the CLI, `serve run` and the tests
run on a CPU in seconds with no downloads, through the same loader as the real checkpoint.
`random_checkpoint.write_random_checkpoint` writes it, as it writes full-size random ones.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from bagel_ray.model.config import BagelConfig, LLMConfig, ResizeConfig, VAEConfig, ViTConfig
from bagel_ray.model.layout import EMA_FILE
from bagel_ray.model.random_checkpoint import write_random_checkpoint

TINY_VERSION = 1
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


def make_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Write the tiny checkpoint into `folder` (created if needed); same bytes for a seed."""
    return write_random_checkpoint(folder, TINY_CONFIG, seed)


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
