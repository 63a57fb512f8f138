"""The official file layout of a BAGEL checkpoint: the file names, the name and shape of every
`ema.safetensors` tensor for a config, and which part of the model (and which shard of which
fused parameter) each official tensor fills.

What the loader checks a folder against and what the random-checkpoint writer writes; it
knows nothing about where a model comes from (a folder, the hub, `tiny`, `random-7b`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from bagel_ray.model.config import BagelConfig
from bagel_ray.model.llm import STACKED_PARAMS

EMA_FILE = "ema.safetensors"
AE_FILE = "ae.safetensors"
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


def shard_sizes(name: str, rows: int, cfg: BagelConfig) -> list[int]:
    """Rows of each shard of a fused parameter (q/k/v, gate/up) in the order of their shard
    index; one shard of `rows` for any other parameter."""
    llm = cfg.llm
    if "qkv_proj" in name:
        q, kv = llm.num_attention_heads * llm.head_dim, llm.num_key_value_heads * llm.head_dim
        return [q, kv, kv]
    if "gate_up_proj" in name:
        return [llm.intermediate_size, llm.intermediate_size]
    return [rows]


def stage_bytes(cfg: BagelConfig, parts: frozenset[str], bytes_per_param: int = 2) -> int:
    """Bytes of the `ema.safetensors` tensors a stage loads (the VAE not included)."""
    return sum(math.prod(shape) * bytes_per_param for key, shape in checkpoint_layout(cfg).items() if param_target(key).part in parts)

