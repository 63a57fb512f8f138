"""The Qwen2 Mixture-of-Transformers language model of BAGEL (spec section 3).

Every layer holds two experts with the same structure: `und` (plain official names: text,
ViT tokens and image markers) and `gen` (`*_moe_gen` names: VAE latents). Which expert a
token uses is an input (`ExpertRows`), never learned. Attention is shared: all tokens attend
over one K/V sequence, whatever expert produced each row.

The forward maps tensors to tensors. How rows see the cached context is a small strategy
object (`PrefixKV` for prefill, `RaggedKV` for the DiT's CFG branches, `CachedKV` for
decoding into a preallocated cache); it applies the QK-norm and RoPE to the raw q/k heads it
is given, and returns the call's own K/V (post QK-norm and RoPE) for the caller to keep or drop
(None for `CachedKV`, which writes them into its cache). Sampling, scheduling and cache
bookkeeping live in `bagel_ray.engine`.

Projections are fused (q/k/v into `qkv_proj`, gate/up into `gate_up_proj`); the loader maps
the official per-projection names onto them (`STACKED_PARAMS`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bagel_ray.model.attention import attend
from bagel_ray.model.config import LLMConfig
from bagel_ray.model.kernels.decode_attention import decode_attention
from bagel_ray.model.kernels.gemv import linear, silu_mul_linear
from bagel_ray.model.kernels.norm import add_rms_norm, rms_norm
from bagel_ray.model.kernels.rope import QKNormRope

# (official name fragment, fused parameter fragment, shard index) for the loader.
STACKED_PARAMS: tuple[tuple[str, str, int], ...] = (
    ("q_proj", "qkv_proj", 0),
    ("k_proj", "qkv_proj", 1),
    ("v_proj", "qkv_proj", 2),
    ("gate_proj", "gate_up_proj", 0),
    ("up_proj", "gate_up_proj", 1),
)

# Attention masks are boolean (True = may attend) or additive (0 / -inf, in the query dtype).
AttnMask = torch.Tensor
KV = tuple[torch.Tensor, torch.Tensor]  # one layer's keys and values (post QK-norm and RoPE)


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: statistics in fp32, cast back to the input dtype, then times the weight
    (two roundings for bf16 inputs, as the reference does)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight[None], None, self.eps)


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of [B, N] positions, computed in fp32 and cast to the sequence dtype (spec 3.4)."""
    angles = positions.float().unsqueeze(-1) * inv_freq.to(positions.device)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)




@dataclass(frozen=True)
class ExpertRows:
    """Which rows of a [B, N] call use which expert (MoT selection by index, spec 3.1).

    `experts[r]` is 0 (und) or 1 (gen) for each flattened row r; `und_index` lists the und
    rows. The gen expert runs over every row and the und rows are then overwritten by the und
    expert's output: gen rows are nearly all rows in gen calls (two image markers are und), so
    nothing is gathered but those few rows, and nothing waits on the device."""

    experts: torch.Tensor  # [B*N] int
    und_index: torch.Tensor  # [U] long

    @staticmethod
    def from_mask(gen_mask: torch.Tensor) -> "ExpertRows":
        """From a boolean [B, N] mask (True = gen); reads the mask once on the host (a sequence
        rank's slice of a block, `engine/dit_parallel.py`, whose markers fall on some ranks only)."""
        flat = gen_mask.reshape(-1)
        return ExpertRows(flat.to(torch.int32), torch.nonzero(~flat).flatten())

    @staticmethod
    def block_markers(batch: int, n: int, device: torch.device | str) -> "ExpertRows":
        """Image blocks: `[<|vision_start|>] + latents + [<|vision_end|>]` per sample, markers und."""
        experts = torch.ones(batch, n, dtype=torch.int32, device=device)
        experts[:, 0] = experts[:, -1] = 0
        starts = torch.arange(batch, device=device) * n
        return ExpertRows(experts.flatten(), torch.stack((starts, starts + n - 1), dim=1).flatten())


def route(x: torch.Tensor, rows: ExpertRows | None, und_fn, gen_fn) -> torch.Tensor:
    """Apply `und_fn` to und rows and `gen_fn` to gen rows of x [B, N, D] (row-wise functions)."""
    if rows is None:
        return und_fn(x)
    flat = x.reshape(-1, x.shape[-1])
    out = gen_fn(flat)
    if rows.und_index.numel():
        und_out = und_fn(flat.index_select(0, rows.und_index))
        out = out.to(torch.promote_types(out.dtype, und_out.dtype))
        out.index_copy_(0, rows.und_index, und_out.to(out.dtype))
    return out.view(*x.shape[:-1], out.shape[-1])


@dataclass(frozen=True)
class ForwardMode:
    """Precision path of one call (spec 11.3): `gen` calls (VAE context blocks, denoising) run
    QK-norm and RoPE in fp32 for every row, `und` calls in the sequence dtype."""

    gen: bool = False


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttnMask | None, causal: bool = False,
         flash: bool = False) -> torch.Tensor:
    """[B, Lq, H, hd] queries over [B, Lk, kv, hd] keys/values (GQA), mask [B, Lq, Lk] or None;
    `causal` and `flash` as in `attention.attend`."""
    out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                 None if mask is None else mask.unsqueeze(1), causal, flash)
    return out.transpose(1, 2)


def _split_qk(qk: torch.Tensor, norm: QKNormRope) -> tuple[torch.Tensor, torch.Tensor]:
    """The normed q and k heads of raw qk heads [B, N, heads + kv, hd]."""
    qk = norm(qk)
    return qk[:, :, : norm.q_heads], qk[:, :, norm.q_heads :]


class PrefixKV:
    """Attend over `[cached context ; this call's rows]`: prefill and single contexts. `past`
    holds per-layer [B, T, kv, hd] keys and values (None: no context). Which keys a row sees:
    all of them; with `causal`, all of the context and the rows up to its own (a text block);
    or `mask` [B, N, T+N] (padded batches). Prefill lengths change with every prompt and
    image, so this attention takes the kernel that needs no per-length plan (`attention`)."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]] | None = None, mask: AttnMask | None = None,
                 causal: bool = False) -> None:
        self.past, self.mask, self.causal = past, mask, causal

    def __call__(self, layer: int, qk: torch.Tensor, v: torch.Tensor, norm: QKNormRope) -> tuple[torch.Tensor, KV]:
        q, k = _split_qk(qk, norm)
        keys, values = k, v
        if self.past is not None:
            keys = torch.cat((self.past[layer][0], k), dim=1)
            values = torch.cat((self.past[layer][1], v), dim=1)
        return sdpa(q, keys, values, self.mask, self.causal, flash=True), (k, v)


class RaggedKV:
    """Each sample attends over its own context (of its own length) and its whole block,
    without padding or a mask: the DiT's CFG branches. `past[b]` is sample b's per-layer
    ([T_b, kv, hd], [T_b, kv, hd]) or None. With `out` ([B, N, heads, hd]) the samples'
    outputs are written there (where a CUDA graph reads them) instead of into a new tensor."""

    def __init__(self, past: list[list[tuple[torch.Tensor, torch.Tensor]] | None], out: torch.Tensor | None = None) -> None:
        self.past = past
        self.out = out

    def into(self, out: torch.Tensor) -> "RaggedKV":
        return RaggedKV(self.past, out)

    def __call__(self, layer: int, qk: torch.Tensor, v: torch.Tensor, norm: QKNormRope) -> tuple[torch.Tensor, KV]:
        q, k = _split_qk(qk, norm)
        outs = []
        for b, past in enumerate(self.past):
            kb, vb = k[b], v[b]
            if past is not None and past[layer][0].shape[0]:
                kb = torch.cat((past[layer][0], kb))
                vb = torch.cat((past[layer][1], vb))
            outs.append(sdpa(q[b : b + 1], kb[None], vb[None], None))
        return torch.cat(outs, out=self.out), (k, v)


class CachedKV:
    """Decoding into a preallocated cache: this call's K/V (one row per sample) are written in
    place at `write_at` [B], then the query attends over the cache rows up to it
    (`decode_attention`, which also applies the QK-norm and RoPE). Static shapes and
    no host reads, so a step can be captured in a CUDA graph. `cache` is [layers, 2, B, W,
    kv, hd]; the K/V it returns are None (they are in the cache)."""

    def __init__(self, cache: torch.Tensor, write_at: torch.Tensor) -> None:
        self.cache, self.write_at = cache, write_at
        layers, _, batch, _, kv, _ = cache.shape
        self.arrived = torch.zeros(layers, batch * kv, dtype=torch.int32, device=cache.device)  # the kernel's counters

    def __call__(self, layer: int, qk: torch.Tensor, v: torch.Tensor, norm: QKNormRope) -> tuple[torch.Tensor, None]:
        return decode_attention(qk, v, norm, self.cache[layer, 0], self.cache[layer, 1], self.write_at,
                                self.arrived[layer]), None


KVAttention = PrefixKV | RaggedKV | CachedKV


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

    # The projections go through `linear` (a GEMV for a single row on the GPU); the
    # nn.Linear modules hold the weights under their official names.
    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.qkv_proj.weight, self.qkv_proj.bias)

    def out(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.o_proj.weight)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return silu_mul_linear(linear(x, self.gate_up_proj.weight), self.down_proj.weight)


def _experts(rows: ExpertRows | None) -> torch.Tensor | None:
    """The per-row expert index the norm and QK-norm kernels take (None: every row und)."""
    return None if rows is None else rows.experts


def _weights(rows: ExpertRows | None, und: RMSNorm, gen: RMSNorm | None) -> torch.Tensor:
    """[E, D] norm weights for per-row selection: und only, or und and gen. The pair is stacked
    once and kept on the und norm while neither weight changes (same storage, no in-place
    write) and autograd's mode is the same: stacking per call was ~110 small copies a DiT
    forward, each a kernel launch."""
    if rows is None:
        return und.weight[None]
    key = tuple((id(w), w.data_ptr(), w._version) for w in (und.weight, gen.weight)) + (
        torch.is_inference_mode_enabled(), torch.is_grad_enabled())
    kept = getattr(und, "_stacked_with_gen", None)
    if kept is None or kept[0] != key:
        kept = (key, torch.stack((und.weight, gen.weight)))
        und._stacked_with_gen = kept  # a tuple: a plain attribute, not a parameter or buffer
    return kept[1]


class DecoderLayer(nn.Module):
    """One MoT decoder layer. Official names: `und` weights sit directly on the layer
    (`self_attn.q_proj`, `mlp.gate_proj`, ...) and `gen` weights carry `_moe_gen`; the loader
    translates (see `bagel_ray.model.loader`). `with_gen=False` builds a Thinker-only layer."""

    def __init__(self, cfg: LLMConfig, with_gen: bool, index: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.index = index
        self.und = Expert(cfg)
        self.gen = Expert(cfg) if with_gen else None

    def forward(
        self,
        x: torch.Tensor,
        pending: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        rows: ExpertRows | None,
        attention: KVAttention,
        mode: ForwardMode,
    ) -> tuple[torch.Tensor, torch.Tensor, KV | None]:
        """`x` is the residual stream and `pending` the previous layer's MLP output, not yet
        added: each residual add runs fused with the RMSNorm that follows it. Returns the
        stream, this layer's MLP output (pending) and its K/V (None when the attention keeps them)."""
        x, h = self.before_attention(x, pending, rows)
        attn, kv = self.attend(h, cos, sin, rows, attention, mode)
        x, pending = self.after_attention(x, attn, rows)
        return x, pending, kv

    # The three parts of `forward`. Only `attend` reads the context or the positions, so the other
    # two depend on nothing but the rows' shape: the DiT replays them as CUDA graphs.
    def before_attention(self, x: torch.Tensor, pending: torch.Tensor | None, rows: ExpertRows | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add and input norm, then the q/k/v projection: (stream, raw q/k/v rows)."""
        if rows is not None and self.gen is None:
            raise RuntimeError("this model was loaded without the generation expert")
        und, gen = self.und, self.gen
        x, h = add_rms_norm(x, pending, _weights(rows, und.input_layernorm, gen and gen.input_layernorm),
                            _experts(rows), self.cfg.rms_norm_eps)
        return x, route(h, rows, und.qkv, gen.qkv if gen is not None else None)

    def attend(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: ExpertRows | None,
               attention: KVAttention, mode: ForwardMode) -> tuple[torch.Tensor, KV | None]:
        """QK-norm, RoPE and attention of the raw q/k/v rows `h`: ([B, N, heads * hd], K/V)."""
        cfg, und, gen = self.cfg, self.und, self.gen
        B, N, _ = h.shape
        hd, nq, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        qk = h[..., : und.q_size + und.kv_size].unflatten(-1, (nq + nkv, hd))
        v = h[..., und.q_size + und.kv_size :].unflatten(-1, (nkv, hd))
        norm = QKNormRope(_weights(rows, und.q_norm, gen and gen.q_norm),
                          _weights(rows, und.k_norm, gen and gen.k_norm), nq,
                          _experts(rows), cos, sin, cfg.rms_norm_eps, mode.gen)
        attn, kv = attention(self.index, qk, v, norm)
        return attn.reshape(B, N, nq * hd), kv

    def after_attention(self, x: torch.Tensor, attn: torch.Tensor, rows: ExpertRows | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The output projection, the residual add and post-attention norm, then the MLP:
        (stream, MLP output not yet added)."""
        und, gen = self.und, self.gen
        x, h = add_rms_norm(x, route(attn, rows, und.out, gen.out if gen is not None else None),
                            _weights(rows, und.post_attention_layernorm, gen and gen.post_attention_layernorm),
                            _experts(rows), self.cfg.rms_norm_eps)
        return x, route(h, rows, und.mlp, gen.mlp if gen is not None else None)


class MoTLanguageModel(nn.Module):
    """Backbone: token embedding, decoder layers, final norms (`norm` for und rows,
    `norm_moe_gen` for gen rows). Official prefix: `language_model.model`."""

    def __init__(self, cfg: LLMConfig, with_gen: bool) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, with_gen, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if with_gen else None
        self.register_buffer("inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta), persistent=False)

    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        rows: ExpertRows | None = None,
        attention: KVAttention | None = None,
        mode: ForwardMode = ForwardMode(),
        with_stream: bool = False,
    ) -> tuple[torch.Tensor, list[KV | None]] | tuple[torch.Tensor, list[KV | None], torch.Tensor]:
        """embeds [B, N, D], positions [B, N], rows: the expert of each row (None: all und),
        attention: how rows see the context (default: only each other). Returns the final-normed
        hidden states and this call's per-layer K/V ([B, N, kv, hd] each, post QK-norm/RoPE; None
        each with `CachedKV`); `with_stream` adds the residual stream after the last layer
        (before the final norm), what TaylorSeer extrapolates (`engine/taylorseer.py`)."""
        attention = attention if attention is not None else PrefixKV()
        cos, sin = rope_cos_sin(positions, self.inv_freq, embeds.dtype)
        x, pending = embeds, None
        new_kv = []
        for layer in self.layers:
            x, pending, kv = layer(x, pending, cos, sin, rows, attention, mode)
            new_kv.append(kv)
        stream, hidden = self.final_norm(x, pending, rows)
        return (hidden, new_kv, stream) if with_stream else (hidden, new_kv)

    def final_norm(self, x: torch.Tensor, pending: torch.Tensor | None, rows: ExpertRows | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The last residual add and the final norm (`norm` / `norm_moe_gen` by row): (the
        residual stream after the last layer, its normed rows)."""
        weights = _weights(rows, self.norm, self.norm_moe_gen)
        return add_rms_norm(x, pending, weights, _experts(rows), self.cfg.rms_norm_eps)


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
