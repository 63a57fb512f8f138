"""The Qwen2 Mixture-of-Transformers language model of BAGEL (spec section 3).

Every layer holds two experts with the same structure: `und` (plain official names: text,
ViT tokens and image markers) and `gen` (`*_moe_gen` names: VAE latents). Which expert a
token uses is an input (`gen_mask`), never learned. Attention is shared: all tokens attend
over one K/V sequence, whatever expert produced each row.

The forward maps tensors to tensors. The caller passes the cached K/V of the context and an
attention mask; the layer returns this call's K/V (post QK-norm and RoPE) for the caller to
keep or drop. Sampling, scheduling and cache bookkeeping live in `bagel_ray.engine`.

Projections are fused (q/k/v into `qkv_proj`, gate/up into `gate_up_proj`); the loader maps
the official per-projection names onto them (`STACKED_PARAMS`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bagel_ray.model.config import LLMConfig

# (official name fragment, fused parameter fragment, shard index) for the loader.
STACKED_PARAMS: tuple[tuple[str, str, int], ...] = (
    ("q_proj", "qkv_proj", 0),
    ("k_proj", "qkv_proj", 1),
    ("v_proj", "qkv_proj", 2),
    ("gate_proj", "gate_up_proj", 0),
    ("up_proj", "gate_up_proj", 1),
)

# Attention masks are boolean: True = may attend.
AttnMask = torch.Tensor


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: statistics in fp32, cast back to the input dtype, then times the weight
    (two roundings for bf16 inputs, as the reference does)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of [B, N] positions, computed in fp32 and cast to the sequence dtype (spec 3.4)."""
    angles = positions.float().unsqueeze(-1) * inv_freq.to(positions.device)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, N, heads, head_dim]; cos/sin: [B, N, head_dim]."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin


def route(x: torch.Tensor, gen_mask: torch.Tensor | None, und_fn, gen_fn, out_dim: int) -> torch.Tensor:
    """Apply `und_fn` to und rows and `gen_fn` to gen rows of x [B, N, D] (MoT selection by
    index). The output keeps the functions' dtype (gen-mode QK-norm returns fp32)."""
    if gen_mask is None:
        return und_fn(x)
    und_mask = ~gen_mask
    und_out, gen_out = und_fn(x[und_mask]), gen_fn(x[gen_mask])
    out = x.new_empty(*x.shape[:-1], out_dim, dtype=torch.promote_types(und_out.dtype, gen_out.dtype))
    out[und_mask] = und_out.to(out.dtype)
    out[gen_mask] = gen_out.to(out.dtype)
    return out


@dataclass(frozen=True)
class ForwardMode:
    """Precision path of one call (spec 11.3): `gen` calls (VAE context blocks, denoising) run
    QK-norm and RoPE in fp32 for every row, `und` calls in the sequence dtype."""

    gen: bool = False


class Expert(nn.Module):
    """One expert's weights of one decoder layer (und or gen)."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_size = cfg.num_attention_heads * hd
        self.kv_size = cfg.num_key_value_heads * hd
        self.input_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.qkv_proj = nn.Linear(d, self.q_size + 2 * self.kv_size, bias=True)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.o_proj = nn.Linear(self.q_size, d, bias=False)
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.gate_up_proj = nn.Linear(d, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, d, bias=False)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """One MoT decoder layer. Official names: `und` weights sit directly on the layer
    (`self_attn.q_proj`, `mlp.gate_proj`, ...) and `gen` weights carry `_moe_gen`; the loader
    translates (see `bagel_ray.model.loader`). `with_gen=False` builds a Thinker-only layer."""

    def __init__(self, cfg: LLMConfig, with_gen: bool) -> None:
        super().__init__()
        self.cfg = cfg
        self.und = Expert(cfg)
        self.gen = Expert(cfg) if with_gen else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        gen_mask: torch.Tensor | None,
        past_kv: tuple[torch.Tensor, torch.Tensor] | None,
        attn_mask: AttnMask | None,
        mode: ForwardMode,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        cfg = self.cfg
        B, N, _ = x.shape
        hd, nq, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        if gen_mask is not None and self.gen is None:
            raise RuntimeError("this model was loaded without the generation expert")
        und, gen = self.und, self.gen
        qkv_dim = und.q_size + 2 * und.kv_size

        def qkv(expert: Expert):
            def fn(rows: torch.Tensor) -> torch.Tensor:
                h = expert.qkv_proj(expert.input_layernorm(rows))
                q, k, v = h.split((expert.q_size, expert.kv_size, expert.kv_size), dim=-1)
                q = q.unflatten(-1, (nq, hd))
                k = k.unflatten(-1, (nkv, hd))
                if mode.gen:
                    q, k = q.float(), k.float()
                q, k = expert.q_norm(q), expert.k_norm(k)
                return torch.cat((q.flatten(-2), k.flatten(-2), v.to(q.dtype)), dim=-1)

            return fn

        residual = x
        h = route(x, gen_mask, qkv(und), qkv(gen) if gen is not None else None, qkv_dim)
        q, k, v = h.split((und.q_size, und.kv_size, und.kv_size), dim=-1)
        q = apply_rope(q.unflatten(-1, (nq, hd)), cos, sin).to(x.dtype)
        k = apply_rope(k.unflatten(-1, (nkv, hd)), cos, sin).to(x.dtype)
        v = v.unflatten(-1, (nkv, hd)).to(x.dtype)
        new_kv = (k, v)
        if past_kv is not None:
            k = torch.cat((past_kv[0], k), dim=1)
            v = torch.cat((past_kv[1], v), dim=1)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=None if attn_mask is None else attn_mask.unsqueeze(1),
            enable_gqa=True,
        )
        attn = attn.transpose(1, 2).reshape(B, N, nq * hd)
        x = residual + route(attn, gen_mask, und.o_proj, gen.o_proj if gen is not None else None, cfg.hidden_size)

        def mlp(expert: Expert):
            return lambda rows: expert.mlp(expert.post_attention_layernorm(rows))

        x = x + route(x, gen_mask, mlp(und), mlp(gen) if gen is not None else None, cfg.hidden_size)
        return x, new_kv


class MoTLanguageModel(nn.Module):
    """Backbone: token embedding, decoder layers, final norms (`norm` for und rows,
    `norm_moe_gen` for gen rows). Official prefix: `language_model.model`."""

    def __init__(self, cfg: LLMConfig, with_gen: bool) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, with_gen) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if with_gen else None
        self.register_buffer("inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta), persistent=False)

    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        gen_mask: torch.Tensor | None = None,
        past_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        attn_mask: AttnMask | None = None,
        mode: ForwardMode = ForwardMode(),
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """embeds [B, N, D], positions [B, N], gen_mask [B, N] bool or None (all und),
        past_kv per layer ([B, T, kv, hd] keys and values) or None, attn_mask [B, N, T+N] bool
        or None (every query sees every key). Returns the final-normed hidden states and this
        call's per-layer K/V."""
        cos, sin = rope_cos_sin(positions, self.inv_freq, embeds.dtype)
        x = embeds
        new_kv = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, cos, sin, gen_mask, None if past_kv is None else past_kv[i], attn_mask, mode)
            new_kv.append(kv)
        norm_gen = self.norm_moe_gen.forward if self.norm_moe_gen is not None else None
        x = route(x, gen_mask, self.norm.forward, norm_gen, self.cfg.hidden_size)
        return x, new_kv


def attention_mask(past_lens: torch.Tensor, past_width: int, new_lens: torch.Tensor, num_new: int, causal: bool) -> AttnMask:
    """Boolean mask [B, N, T+N] for queries over `[padded cache (T) ; new tokens (N)]`.

    Cache row j of sample b is visible iff j < past_lens[b]. New token k is visible to query i
    iff k < new_lens[b] and, when causal, k <= i (flash-attn's bottom-right alignment: every
    new token sees the whole context)."""
    device = past_lens.device
    cache_ok = torch.arange(past_width, device=device)[None, :] < past_lens[:, None]  # [B, T]
    new_idx = torch.arange(num_new, device=device)
    new_ok = new_idx[None, :] < new_lens[:, None]  # [B, N]
    block = new_ok[:, None, :].expand(-1, num_new, -1)
    if causal:
        block = block & (new_idx[None, :, None] >= new_idx[None, None, :])
    return torch.cat((cache_ok[:, None, :].expand(-1, num_new, -1), block), dim=-1)
