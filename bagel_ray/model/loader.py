"""Loads the official Hugging Face layout of BAGEL-7B-MoT, by name, for one stage.

The network is built on the meta device; each tensor a stage needs is then read from the
memory-mapped `ema.safetensors` straight into the target dtype and device (never as a full
fp32 copy). The official per-projection names (q/k/v, gate/up, `*_moe_gen`) map onto our
fused parameters through one table. Missing, unexpected or misshapen tensors raise
`CheckpointError` naming the official key.
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

from bagel_ray.model.bagel import ALL_PARTS, BagelModel
from bagel_ray.model.config import BagelConfig, read_bagel_config
from bagel_ray.model.llm import STACKED_PARAMS, rope_inv_freq
from bagel_ray.model.tokenizer import BagelTokenizer
from bagel_ray.model.vae import AutoEncoder, load_vae

log = logging.getLogger(__name__)

EMA_FILE = "ema.safetensors"
AE_FILE = "ae.safetensors"
DEFAULT_MODEL = "ByteDance-Seed/BAGEL-7B-MoT"
RANDOM_MODEL = "random-7b"  # the full-size shapes with random weights (benchmarks)
_LAYER_KEY = re.compile(
    r"language_model\.model\.layers\.(\d+)\."
    r"(?:(self_attn)\.(q_proj|k_proj|v_proj|o_proj|q_norm|k_norm)(_moe_gen)?"
    r"|(mlp|mlp_moe_gen)\.(gate_proj|up_proj|down_proj)"
    r"|(input_layernorm|post_attention_layernorm)(_moe_gen)?)"
    r"\.(weight|bias)$"
)
_STACKED = {name: (fused, shard) for name, fused, shard in STACKED_PARAMS}


class CheckpointError(ValueError):
    """The checkpoint folder does not hold what the model needs."""


@dataclass(frozen=True)
class ParamTarget:
    """Where an official tensor goes: our parameter name, the shard of a fused parameter
    (or None), and the part of the model it belongs to."""

    name: str
    shard: int | None
    part: str


def param_target(key: str) -> ParamTarget:
    """Map an official `ema.safetensors` key onto our module tree."""
    m = _LAYER_KEY.fullmatch(key)
    if m:
        layer, attn, attn_proj, attn_gen, mlp, mlp_proj, norm, norm_gen, kind = m.groups()
        if attn:
            proj, expert = attn_proj, "gen" if attn_gen else "und"
        elif mlp:
            proj, expert = mlp_proj, "gen" if mlp == "mlp_moe_gen" else "und"
        else:
            proj, expert = norm, "gen" if norm_gen else "und"
        fused, shard = _STACKED.get(proj, (proj, None))
        return ParamTarget(f"language_model.model.layers.{layer}.{expert}.{fused}.{kind}", shard, expert)
    if key.startswith("language_model.model.embed_tokens.") or key == "language_model.model.norm.weight":
        return ParamTarget(key, None, "und")
    if key == "language_model.model.norm_moe_gen.weight":
        return ParamTarget(key, None, "gen")
    if key.startswith("language_model.lm_head."):
        return ParamTarget(key, None, "lm_head")
    if key.split(".")[0] in ("vit_model", "connector", "vit_pos_embed"):
        return ParamTarget(key, None, "vit")
    if key.split(".")[0] in ("time_embedder", "vae2llm", "llm2vae", "latent_pos_embed"):
        return ParamTarget(key, None, "gen_heads")
    raise CheckpointError(f"unexpected tensor {key!r} in {EMA_FILE}")


def checkpoint_layout(cfg: BagelConfig) -> dict[str, tuple[int, ...]]:
    """Official `ema.safetensors` names and shapes for a config (1223 entries at 7B size).
    Used to validate a checkpoint, to write tiny ones and to count bytes per stage."""
    llm, vit, d = cfg.llm, cfg.vit, cfg.llm.hidden_size
    hd, q, kv, ff = llm.head_dim, llm.num_attention_heads * llm.head_dim, llm.num_key_value_heads * llm.head_dim, llm.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"language_model.model.embed_tokens.weight": (llm.vocab_size, d)}
    for i in range(llm.num_hidden_layers):
        p = f"language_model.model.layers.{i}"
        for g in ("", "_moe_gen"):
            shapes |= {
                f"{p}.self_attn.q_proj{g}.weight": (q, d), f"{p}.self_attn.q_proj{g}.bias": (q,),
                f"{p}.self_attn.k_proj{g}.weight": (kv, d), f"{p}.self_attn.k_proj{g}.bias": (kv,),
                f"{p}.self_attn.v_proj{g}.weight": (kv, d), f"{p}.self_attn.v_proj{g}.bias": (kv,),
                f"{p}.self_attn.o_proj{g}.weight": (d, q),
                f"{p}.self_attn.q_norm{g}.weight": (hd,), f"{p}.self_attn.k_norm{g}.weight": (hd,),
                f"{p}.input_layernorm{g}.weight": (d,), f"{p}.post_attention_layernorm{g}.weight": (d,),
            }
            mlp = "mlp_moe_gen" if g else "mlp"
            shapes |= {f"{p}.{mlp}.gate_proj.weight": (ff, d), f"{p}.{mlp}.up_proj.weight": (ff, d), f"{p}.{mlp}.down_proj.weight": (d, ff)}
    shapes |= {
        "language_model.model.norm.weight": (d,),
        "language_model.model.norm_moe_gen.weight": (d,),
        "language_model.lm_head.weight": (llm.vocab_size, d),
        "time_embedder.mlp.0.weight": (d, cfg.timestep_embed_dim), "time_embedder.mlp.0.bias": (d,),
        "time_embedder.mlp.2.weight": (d, d), "time_embedder.mlp.2.bias": (d,),
        "vae2llm.weight": (d, cfg.patch_latent_dim), "vae2llm.bias": (d,),
        "llm2vae.weight": (cfg.patch_latent_dim, d), "llm2vae.bias": (cfg.patch_latent_dim,),
        "latent_pos_embed.pos_embed": (cfg.max_latent_size**2, d),
    }
    v, vp = vit.hidden_size, "vit_model.vision_model"
    shapes |= {
        f"{vp}.embeddings.patch_embedding.weight": (v, vit.patch_dim), f"{vp}.embeddings.patch_embedding.bias": (v,),
        f"{vp}.embeddings.position_embedding.weight": (cfg.vit_max_num_patch_per_side**2, v),
    }
    for i in range(vit.num_layers):
        p = f"{vp}.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes |= {f"{p}.self_attn.{proj}.weight": (v, v), f"{p}.self_attn.{proj}.bias": (v,)}
        for ln in ("layer_norm1", "layer_norm2"):
            shapes |= {f"{p}.{ln}.weight": (v,), f"{p}.{ln}.bias": (v,)}
        shapes |= {
            f"{p}.mlp.fc1.weight": (vit.intermediate_size, v), f"{p}.mlp.fc1.bias": (vit.intermediate_size,),
            f"{p}.mlp.fc2.weight": (v, vit.intermediate_size), f"{p}.mlp.fc2.bias": (v,),
        }
    shapes |= {
        f"{vp}.post_layernorm.weight": (v,), f"{vp}.post_layernorm.bias": (v,),
        "connector.fc1.weight": (d, v), "connector.fc1.bias": (d,),
        "connector.fc2.weight": (d, d), "connector.fc2.bias": (d,),
        "vit_pos_embed.pos_embed": (cfg.vit_max_num_patch_per_side**2, d),
    }
    return shapes


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
                sizes = _shard_sizes(target.name, rows, cfg)
                start = sum(sizes[: target.shard])
                param.data[start : start + sizes[target.shard]].copy_(tensor)
                filled[target.name] = filled.get(target.name, 0) + 1
    for name, param in params.items():
        need = len(_shard_sizes(name, param.shape[0], cfg)) if name.endswith(("qkv_proj.weight", "qkv_proj.bias", "gate_up_proj.weight")) else 1
        if filled.get(name, 0) != need:
            raise CheckpointError(f"{folder / EMA_FILE}: no complete tensor for parameter {name!r}")
    # The only buffer: not in the checkpoint, recomputed in fp32 (spec 2.1).
    model.llm.inv_freq = rope_inv_freq(cfg.llm.head_dim, cfg.llm.rope_theta).to(device)
    model.eval()
    return model


def _shard_sizes(name: str, rows: int, cfg: BagelConfig) -> list[int]:
    llm = cfg.llm
    if "qkv_proj" in name:
        q, kv = llm.num_attention_heads * llm.head_dim, llm.num_key_value_heads * llm.head_dim
        return [q, kv, kv]
    if "gate_up_proj" in name:
        return [llm.intermediate_size, llm.intermediate_size]
    return [rows]


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
        from bagel_ray.model.tiny import tiny_model_path

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
        from bagel_ray.model import random_init

        net = random_init.random_model(parts, str(device), dtype)
        vae = random_init.random_vae(net.cfg, str(device), vae_dtype) if "vae" in parts else None
        return LoadedCheckpoint(Path(str(model)), net.cfg, net, random_init.tokenizer(), vae)
    folder = resolve_model_path(model)
    net = load_model(folder, parts, device, dtype)
    vae = load_vae(folder / AE_FILE, net.cfg.vae, device, vae_dtype) if "vae" in parts else None
    log.info("loaded %s parts=%s dtype=%s device=%s", folder, sorted(parts), dtype, device)
    return LoadedCheckpoint(folder, net.cfg, net, BagelTokenizer.from_folder(folder), vae)


def stage_bytes(cfg: BagelConfig, parts: frozenset[str], bytes_per_param: int = 2) -> int:
    """Bytes of the `ema.safetensors` tensors a stage loads (the VAE not included)."""
    return sum(math.prod(shape) * bytes_per_param for key, shape in checkpoint_layout(cfg).items() if param_target(key).part in parts)

