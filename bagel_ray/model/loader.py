"""Loads a BAGEL-7B-MoT checkpoint for one stage, from wherever the model comes from: a folder
in the official Hugging Face layout, a hub id, `tiny` (the embedded random checkpoint) or
`random-7b` (full-size shapes with random weights, built on the device).

The network is built on the meta device; each tensor a stage needs is then read from the
memory-mapped `ema.safetensors` straight into the target dtype and device (never as a full
fp32 copy). The official per-projection names (q/k/v, gate/up, `*_moe_gen`) map onto our
fused parameters through the layout's table (`layout.py`). Missing, unexpected or misshapen
tensors raise `CheckpointError` naming the official key.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from bagel_ray.model import random_init
from bagel_ray.model.bagel import ALL_PARTS, BagelModel
from bagel_ray.model.config import BagelConfig, read_bagel_config
from bagel_ray.model.layout import AE_FILE, EMA_FILE, CheckpointError, checkpoint_layout, param_target, shard_sizes
from bagel_ray.model.llm import rope_inv_freq
from bagel_ray.model.tiny import tiny_model_path
from bagel_ray.model.tokenizer import BagelTokenizer
from bagel_ray.model.vae import AutoEncoder, load_vae

log = logging.getLogger(__name__)

DEFAULT_MODEL = "ByteDance-Seed/BAGEL-7B-MoT"
RANDOM_MODEL = "random-7b"  # the full-size shapes with random weights (benchmarks)


def read_config(folder: Path) -> BagelConfig:
    """The config of a checkpoint folder. The two position-table sizes come from the tensor
    shapes in `ema.safetensors` (the hub's `config.json` has a stale `max_latent_size`)."""
    folder = Path(folder)
    ema = folder / EMA_FILE
    if not ema.exists():
        raise CheckpointError(f"{ema} not found: not a BAGEL checkpoint folder")
    with safe_open(str(ema), framework="pt") as f:
        keys = set(f.keys())
        grids = {}
        for key in ("latent_pos_embed.pos_embed", "vit_model.vision_model.embeddings.position_embedding.weight"):
            if key not in keys:
                raise CheckpointError(f"{ema}: missing tensor {key!r}")
            rows = f.get_slice(key).get_shape()[0]
            grids[key] = math.isqrt(rows)
            if grids[key] ** 2 != rows:
                raise CheckpointError(f"{ema}: {key!r} has {rows} rows, not a square grid")
    return read_bagel_config(folder, grids["latent_pos_embed.pos_embed"], grids["vit_model.vision_model.embeddings.position_embedding.weight"])


def _materialize(module: nn.Module, name: str, device: torch.device, dtype: torch.dtype) -> nn.Parameter:
    """Swap a meta parameter for an uninitialised real one (for fused params filled by shards)."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    old = getattr(owner, leaf)
    if old.device.type != "meta":
        return old
    new = nn.Parameter(torch.empty(old.shape, device=device, dtype=dtype), requires_grad=False)
    setattr(owner, leaf, new)
    return new


def load_model(folder: Path, parts: frozenset[str] = ALL_PARTS, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.bfloat16) -> BagelModel:
    """Build the model for `parts` and load its tensors from `folder/ema.safetensors`."""
    folder = Path(folder)
    cfg = read_config(folder)
    device = torch.device(device)
    with torch.device("meta"):
        model = BagelModel(cfg, frozenset(parts) - {"vae"})
    expected = checkpoint_layout(cfg)
    params = dict(model.named_parameters())
    filled: dict[str, int] = {}
    with safe_open(str(folder / EMA_FILE), framework="pt", device="cpu") as f:
        present = set(f.keys())
        missing = [k for k in expected if k not in present and param_target(k).part in model.parts]
        if missing:
            raise CheckpointError(f"{folder / EMA_FILE}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
        for key in sorted(present):
            target = param_target(key)
            if key not in expected:  # checked for every part, so all stages agree on validity
                raise CheckpointError(f"unexpected tensor {key!r} in {folder / EMA_FILE}")
            if target.part not in model.parts:
                continue
            shape = tuple(f.get_slice(key).get_shape())
            if shape != expected[key]:
                raise CheckpointError(f"{folder / EMA_FILE}: tensor {key!r} has shape {list(shape)}, expected {list(expected[key])}")
            tensor = f.get_tensor(key).to(device=device, dtype=dtype)
            if target.shard is None:
                owner_name, _, leaf = target.name.rpartition(".")
                setattr(model.get_submodule(owner_name), leaf, nn.Parameter(tensor, requires_grad=False))
                filled[target.name] = 1
            else:
                param = _materialize(model, target.name, device, dtype)
                rows = param.shape[0]
                sizes = shard_sizes(target.name, rows, cfg)
                start = sum(sizes[: target.shard])
                param.data[start : start + sizes[target.shard]].copy_(tensor)
                filled[target.name] = filled.get(target.name, 0) + 1
    for name, param in params.items():
        need = len(shard_sizes(name, param.shape[0], cfg)) if name.endswith(("qkv_proj.weight", "qkv_proj.bias", "gate_up_proj.weight")) else 1
        if filled.get(name, 0) != need:
            raise CheckpointError(f"{folder / EMA_FILE}: no complete tensor for parameter {name!r}")
    # The only buffer: not in the checkpoint, recomputed in fp32 (spec 2.1).
    model.llm.inv_freq = rope_inv_freq(cfg.llm.head_dim, cfg.llm.rope_theta).to(device)
    model.eval()
    return model


@dataclass
class LoadedCheckpoint:
    """What a stage gets from a checkpoint folder."""

    folder: Path
    config: BagelConfig
    model: BagelModel
    tokenizer: BagelTokenizer
    vae: AutoEncoder | None


def resolve_model_path(model: str | Path) -> Path:
    """A local folder, `tiny` (the embedded random checkpoint, made on first use), or a
    Hugging Face hub id (downloaded with `huggingface_hub` when it is installed)."""
    if str(model) == "tiny":
        return tiny_model_path()
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(model)) and not path.exists():
        try:
            from huggingface_hub import snapshot_download
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise CheckpointError(
                f"{model!r} is not a local folder; install huggingface_hub (pip install 'bagel-ray[hub]') "
                "to download it from the hub, or pass a local path"
            ) from exc
        return Path(snapshot_download(str(model), allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    raise CheckpointError(f"model {str(model)!r}: no such folder")


def load_checkpoint(model: str | Path, parts: frozenset[str] = ALL_PARTS, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.bfloat16, vae_dtype: torch.dtype = torch.float32) -> LoadedCheckpoint:
    """Model, tokenizer and (if `vae` is among the parts) the VAE of one stage. `random-7b`
    builds the full-size shapes with random weights instead of reading a checkpoint."""
    if str(model) == RANDOM_MODEL:
        net = random_init.random_model(parts, str(device), dtype)
        vae = random_init.random_vae(net.cfg, str(device), vae_dtype) if "vae" in parts else None
        return LoadedCheckpoint(Path(str(model)), net.cfg, net, random_init.tokenizer(), vae)
    folder = resolve_model_path(model)
    net = load_model(folder, parts, device, dtype)
    vae = load_vae(folder / AE_FILE, net.cfg.vae, device, vae_dtype) if "vae" in parts else None
    log.info("loaded %s parts=%s dtype=%s device=%s", folder, sorted(parts), dtype, device)
    return LoadedCheckpoint(folder, net.cfg, net, BagelTokenizer.from_folder(folder), vae)
