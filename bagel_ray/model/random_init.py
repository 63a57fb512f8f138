"""BAGEL-7B-MoT shapes with random weights (same speed as the real ones), for benchmarks and
capacity tests without the 29 GB checkpoint: `--model random-7b` / `model: random-7b`.

Built on the meta device in the target dtype, then filled in place on the device, so the
weights are allocated once and never in fp32. The tokenizer is the tiny byte-level one (its
ids fit the 7B vocabulary; speed does not depend on which ids a text maps to).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

from bagel_ray.model.bagel import ALL_PARTS, BagelModel
from bagel_ray.model.config import BagelConfig
from bagel_ray.model.llm import rope_inv_freq
from bagel_ray.model.random_checkpoint import sincos_table
from bagel_ray.model.tiny_tokenizer import write_tiny_tokenizer
from bagel_ray.model.tokenizer import BagelTokenizer
from bagel_ray.model.vae import AutoEncoder


@torch.no_grad()
def random_model(parts: frozenset[str] = ALL_PARTS, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                 cfg: BagelConfig | None = None, seed: int = 0) -> BagelModel:
    cfg = cfg or BagelConfig()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = BagelModel(cfg, frozenset(parts) - {"vae"})
    finally:
        torch.set_default_dtype(previous)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        p.requires_grad_(False)
        if name.endswith("pos_embed"):
            p.copy_(sincos_table(math.isqrt(p.shape[0]), p.shape[1]).to(p.dtype))
        elif p.ndim == 1 and "norm" in name and name.endswith("weight"):
            p.fill_(1.0)
        elif p.ndim == 1:
            p.normal_(0.0, 0.02, generator=gen)
        else:
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=gen)
    model.llm.inv_freq = rope_inv_freq(cfg.llm.head_dim, cfg.llm.rope_theta).to(device)
    return model.eval()


def random_vae(cfg: BagelConfig | None = None, device: str = "cuda", dtype: torch.dtype = torch.float32) -> AutoEncoder:
    cfg = cfg or BagelConfig()
    torch.manual_seed(0)
    return AutoEncoder(cfg.vae).to(device=device, dtype=dtype).requires_grad_(False).eval()


def tokenizer() -> BagelTokenizer:
    folder = Path(tempfile.mkdtemp(prefix="bagel-tok-"))
    write_tiny_tokenizer(folder)
    return BagelTokenizer.from_folder(folder)
