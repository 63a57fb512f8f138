"""Fused elementwise kernels of the decoder layer, with the reference's rounding order.

On a CUDA device with Triton these run as single Triton kernels (one read and one write of
each tensor instead of the half-dozen passes of the eager PyTorch ops); elsewhere the eager
reference below runs. Both follow the official code's casts (spec 11.2-11.4):

- `rms_norm`: statistics in fp32, the normalised value cast to the input dtype, then times
  the weight (the product promotes like PyTorch's, fp32 if either operand is fp32).
- `qk_norm_rope`: the per-head QK-norm followed by rotate-half RoPE, of the q heads and the k
  heads of a token in one call (each with its own norm weight). `fp32` reproduces the
  generation path (q/k upcast before the norm, RoPE in fp32 with bf16 cos/sin, one final
  cast); otherwise every step rounds to the input dtype as the understanding path does.
- `silu_mul`: SiLU(gate) * up of the fused gate/up projection.
- `add_rms_norm`: the residual add (rounded to the input dtype, as the eager add) and the
  RMSNorm of the sum, in one pass: returns both, the sum for the next residual.
- `linear` / `silu_mul_linear`: for a single row (decoding at batch 1) a Triton GEMV, which
  streams the weights 8-13 % faster than cuBLAS's kernels on the 7B decode shapes (H100); the
  down projection takes the SiLU-mul of its gate/up input on the fly. More rows go to F.linear.
- `decode_attention`: one decoding step's attention over a preallocated cache: writes the new
  K/V row of each sequence, then its query attends over the rows up to it. The reference is
  `index_put_` and SDPA under an additive mask over the whole cache width; the kernel reads
  only the rows a sequence has (split over the rows, flash-decoding style, the last split
  to finish merging them), applies the QK-norm and RoPE to the raw q/k heads itself and
  writes the new row: one launch a layer instead of seven, and no read of the empty rest of
  a slot.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

try:  # pragma: no cover - exercised on GPU machines
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None


_EAGER = [False]


@contextmanager
def eager() -> Iterator[None]:
    """Run the eager references inside this block (the benchmarks' correctness guard)."""
    _EAGER.append(True)
    try:
        yield
    finally:
        _EAGER.pop()


def in_eager() -> bool:
    """Whether an `eager()` block is active (what is captured in CUDA graphs stays outside)."""
    return _EAGER[-1]


def use_triton(x: torch.Tensor) -> bool:
    """Whether x's op runs as a Triton kernel: on a CUDA device with Triton, outside `eager()`."""
    return triton is not None and not _EAGER[-1] and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16, torch.float32)


# -- eager references -------------------------------------------------------------------


def rms_norm_reference(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x [..., D]; weights [E, D]; experts [rows of x] picks each row's weight (None: weights[0])."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    w = weights[0] if experts is None else weights[experts].view(*x.shape[:-1], x.shape[-1])
    return w * normed.to(x.dtype)


def add_rms_norm_reference(x: torch.Tensor, delta: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor | None,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x = x + delta
    return x, rms_norm_reference(x, weights, experts, eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _qk_norm_rope_heads(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor | None, cos: torch.Tensor,
                        sin: torch.Tensor, eps: float, fp32: bool) -> torch.Tensor:
    dtype = x.dtype
    B, N, H, hd = x.shape
    per_head = None if experts is None else experts.repeat_interleave(H)
    h = rms_norm_reference(x.float() if fp32 else x, weights, per_head, eps)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return (h * cos + rotate_half(h) * sin).to(dtype)


def qk_norm_rope_reference(x: torch.Tensor, q_weights: torch.Tensor, k_weights: torch.Tensor, q_heads: int,
                           experts: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, eps: float,
                           fp32: bool) -> torch.Tensor:
    """x [B, N, heads, hd]: the first `q_heads` heads normed with `q_weights` [E, hd], the rest
    with `k_weights`; experts [B*N] or None; cos/sin [B, N, hd] in the sequence dtype.
    Returns x's dtype, contiguous."""
    q = _qk_norm_rope_heads(x[:, :, :q_heads], q_weights, experts, cos, sin, eps, fp32)
    k = _qk_norm_rope_heads(x[:, :, q_heads:], k_weights, experts, cos, sin, eps, fp32)
    return torch.cat((q, k), dim=2)


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor,
                               values: torch.Tensor, write_at: torch.Tensor) -> torch.Tensor:
    """See `decode_attention`."""
    B, W = keys.shape[0], keys.shape[1]
    batch = torch.arange(B, device=keys.device)
    keys.index_put_((batch, write_at), k[:, 0])
    values.index_put_((batch, write_at), v[:, 0])
    hidden = torch.arange(W, device=keys.device)[None, :] > write_at[:, None]  # [B, W]
    mask = torch.zeros(B, 1, 1, W, dtype=q.dtype, device=q.device).masked_fill_(hidden[:, None, None, :], float("-inf"))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# -- Triton -----------------------------------------------------------------------------

if triton is not None:  # pragma: no cover - compiled on GPU machines only

    @triton.jit
    def _rms_norm_kernel(x_ptr, d_ptr, w_ptr, e_ptr, sum_ptr, out_ptr, n_cols, eps, BLOCK: tl.constexpr,
                         W_FP32: tl.constexpr, HAS_E: tl.constexpr, HAS_D: tl.constexpr):
        # HAS_D: add the residual delta first (rounded as the eager add: fp32 math, one rounding),
        # store the sum, and normalise the sum
        row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: a batch may pass 2^31 elements
        cols = tl.arange(0, BLOCK)
        keep = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=keep, other=0.0)
        if HAS_D:
            d = tl.load(d_ptr + row * n_cols + cols, mask=keep, other=0.0)
            x = (x.to(tl.float32) + d.to(tl.float32)).to(x.dtype)
            tl.store(sum_ptr + row * n_cols + cols, x, mask=keep)
        x32 = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x32 * x32, axis=0) / n_cols + eps)
        normed = (x32 * rstd).to(x.dtype)
        expert = tl.load(e_ptr + row).to(tl.int64) if HAS_E else 0
        w = tl.load(w_ptr + expert * n_cols + cols, mask=keep, other=0.0)
        if W_FP32:
            out = w.to(tl.float32) * normed.to(tl.float32)
        else:
            out = (w.to(tl.float32) * normed.to(tl.float32)).to(x.dtype)
        tl.store(out_ptr + row * n_cols + cols, out, mask=keep)

    @triton.jit
    def _qk_norm_rope_kernel(x_ptr, wq_ptr, wk_ptr, e_ptr, cos_ptr, sin_ptr, out_ptr, heads, q_heads, row_stride, eps,
                             HD: tl.constexpr, HALF: tl.constexpr, HEADS: tl.constexpr, FP32: tl.constexpr,
                             HAS_E: tl.constexpr):
        # one program per token: all its heads (q, then k) as a [HEADS, HALF] tile for each
        # half of the head dim; cos/sin and the expert are per token, the norm weight per head
        # (q or k). x rows may be strided (a view into the fused qkv output); the output is
        # contiguous.
        token = tl.program_id(0).to(tl.int64)
        expert = tl.load(e_ptr + token).to(tl.int64) if HAS_E else 0
        h = tl.arange(0, HEADS)[:, None]
        lo = tl.arange(0, HALF)[None, :]
        keep = h < heads
        src = x_ptr + token * row_stride + h * HD + lo
        x_lo = tl.load(src, mask=keep, other=0.0)
        x_hi = tl.load(src + HALF, mask=keep, other=0.0)
        is_q = h < q_heads
        w_lo = tl.where(is_q, tl.load(wq_ptr + expert * HD + lo), tl.load(wk_ptr + expert * HD + lo)).to(tl.float32)
        w_hi = tl.where(is_q, tl.load(wq_ptr + expert * HD + HALF + lo),
                        tl.load(wk_ptr + expert * HD + HALF + lo)).to(tl.float32)
        c_lo = tl.load(cos_ptr + token * HD + lo).to(tl.float32)
        c_hi = tl.load(cos_ptr + token * HD + HALF + lo).to(tl.float32)
        s_lo = tl.load(sin_ptr + token * HD + lo).to(tl.float32)
        s_hi = tl.load(sin_ptr + token * HD + HALF + lo).to(tl.float32)
        out_lo, out_hi = _norm_rope(x_lo, x_hi, w_lo, w_hi, c_lo, c_hi, s_lo, s_hi, eps, HD, FP32)
        dst = out_ptr + token * heads * HD + h * HD + lo
        tl.store(dst, out_lo, mask=keep)
        tl.store(dst + HALF, out_hi, mask=keep)

    @triton.jit
    def _norm_rope(x_lo, x_hi, w_lo, w_hi, c_lo, c_hi, s_lo, s_hi, eps, HD: tl.constexpr, FP32: tl.constexpr):
        # the QK-norm and rotate-half RoPE of [rows, HD / 2] tiles holding each row's two
        # halves (the weights, cos and sin as fp32, broadcastable); returns both halves in x's dtype
        dtype = x_lo.dtype
        a = x_lo.to(tl.float32)
        b = x_hi.to(tl.float32)
        rstd = tl.rsqrt((tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)) / HD + eps)[:, None]
        if FP32:
            h_lo = w_lo * (a * rstd)
            h_hi = w_hi * (b * rstd)
            out_lo = h_lo * c_lo - h_hi * s_lo
            out_hi = h_hi * c_hi + h_lo * s_hi
        else:
            # every op rounds to the input dtype, as bf16 eager arithmetic does
            h_lo = (w_lo * (a * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
            h_hi = (w_hi * (b * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
            out_lo = (h_lo * c_lo).to(dtype).to(tl.float32) + (-(h_hi * s_lo).to(dtype).to(tl.float32))
            out_hi = (h_hi * c_hi).to(dtype).to(tl.float32) + (h_lo * s_hi).to(dtype).to(tl.float32)
        return out_lo.to(dtype), out_hi.to(dtype)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # rows x 2 x 18944 passes 2^31 past 56k rows (a batch at 1024^2)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        keep = col < n_cols
        gate = tl.load(gu_ptr + row * 2 * n_cols + col, mask=keep, other=0.0)
        up = tl.load(gu_ptr + row * 2 * n_cols + n_cols + col, mask=keep, other=0.0)
        g = gate.to(tl.float32)
        silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
        tl.store(out_ptr + row * n_cols + col, (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=keep)

    @triton.jit
    def _decode_attention_kernel(qk_ptr, v_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr, keys_ptr, values_ptr, at_ptr, out_ptr,
                                 acc_ptr, m_ptr, l_ptr, arrived_ptr, qk_sb, v_sb, c_sb, c_sw, width, scale, eps, chunk,
                                 splits, GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HD: tl.constexpr,
                                 HEADS: tl.constexpr, BLOCK_N: tl.constexpr, FP32: tl.constexpr,
                                 ONE_SPLIT: tl.constexpr):
        # program (sequence b, kv head g, split s): the GROUP query heads of kv head g over the
        # cache rows [s * chunk, (s + 1) * chunk) that are visible (rows 0..at, `at` being the
        # new row). q and the new k arrive raw (qk: a token's HEADS q heads, then its k heads)
        # and get their QK-norm and RoPE here, as `_qk_norm_rope_kernel` gives them, in halves
        # of the head dim; the split that holds row `at` writes the new k and v to the cache,
        # and every split takes them from registers rather than from the cache.
        # With several splits each stores its partial result (unnormalised sum, running max,
        # denominator) and counts itself in `arrived` [B * kv] (zeroed); the last of the splits
        # holding visible rows merges them all into out, so no second kernel is launched.
        # chunk and splits are runtime values: a new cache width compiles nothing.
        HALF: tl.constexpr = HD // 2
        b = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1)
        s = tl.program_id(2)
        at = tl.load(at_ptr + b)
        start = s * chunk
        if start > at:  # this split holds no visible row
            return
        hs = tl.arange(0, BLOCK_H)
        lo = tl.arange(0, HALF)[None, :]
        d = tl.arange(0, HD)
        keep_h = hs < GROUP
        heads = g * GROUP + hs
        c_lo = tl.load(cos_ptr + b * HD + lo).to(tl.float32)
        c_hi = tl.load(cos_ptr + b * HD + HALF + lo).to(tl.float32)
        s_lo = tl.load(sin_ptr + b * HD + lo).to(tl.float32)
        s_hi = tl.load(sin_ptr + b * HD + HALF + lo).to(tl.float32)
        q_at = qk_ptr + b * qk_sb + heads[:, None] * HD + lo
        q_lo, q_hi = _norm_rope(tl.load(q_at, mask=keep_h[:, None], other=0.0),
                                tl.load(q_at + HALF, mask=keep_h[:, None], other=0.0),
                                tl.load(wq_ptr + lo).to(tl.float32), tl.load(wq_ptr + HALF + lo).to(tl.float32),
                                c_lo, c_hi, s_lo, s_hi, eps, HD, FP32)
        k_at = qk_ptr + b * qk_sb + (HEADS + g) * HD + lo
        k_lo, k_hi = _norm_rope(tl.load(k_at), tl.load(k_at + HALF), tl.load(wk_ptr + lo).to(tl.float32),
                                tl.load(wk_ptr + HALF + lo).to(tl.float32), c_lo, c_hi, s_lo, s_hi, eps, HD, FP32)
        v_new = tl.load(v_ptr + b * v_sb + g * HD + d)
        if (at < start + chunk) & (at < width):
            row = b * c_sb + at * c_sw + g * HD
            tl.store(keys_ptr + row + lo, k_lo)
            tl.store(keys_ptr + row + HALF + lo, k_hi)
            tl.store(values_ptr + row + d, v_new)
        m = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, HD], tl.float32)
        for n0 in range(0, chunk, BLOCK_N):
            rows = start + n0 + tl.arange(0, BLOCK_N)
            cached = ((rows < at) & (rows < width))[:, None]
            is_new = (rows == at)[:, None]
            base = b * c_sb + rows[:, None].to(tl.int64) * c_sw + g * HD
            kt_lo = tl.where(is_new, k_lo, tl.load(keys_ptr + base + lo, mask=cached, other=0.0))
            kt_hi = tl.where(is_new, k_hi, tl.load(keys_ptr + base + HALF + lo, mask=cached, other=0.0))
            scores = (tl.dot(q_lo, tl.trans(kt_lo)) + tl.dot(q_hi, tl.trans(kt_hi))) * scale
            scores = tl.where((rows <= at)[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            p = tl.exp(scores - m_new[:, None])
            alpha = tl.exp(m - m_new)
            l = l * alpha + tl.sum(p, axis=1)
            vt = tl.where(is_new, v_new[None, :], tl.load(values_ptr + base + d[None, :], mask=cached, other=0.0))
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
            m = m_new
        out_at = out_ptr + (b * HEADS + heads)[:, None] * HD + d[None, :]
        if ONE_SPLIT:
            tl.store(out_at, (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=keep_h[:, None])
        else:
            part = (b * HEADS + heads) * splits
            tl.store(acc_ptr + (part + s)[:, None] * HD + d[None, :], acc, mask=keep_h[:, None])
            tl.store(m_ptr + part + s, m, mask=keep_h)
            tl.store(l_ptr + part + s, l, mask=keep_h)
            live = at // chunk + 1  # the splits that hold visible rows
            # acq_rel: the partials stored above are seen by the last arrival, and it sees theirs
            if tl.atomic_add(arrived_ptr + b * (HEADS // GROUP) + g, 1, sem="acq_rel") == live - 1:
                m = tl.full([BLOCK_H], float("-inf"), tl.float32)
                l = tl.zeros([BLOCK_H], tl.float32)
                acc = tl.zeros([BLOCK_H, HD], tl.float32)
                for t in range(0, live):
                    m_t = tl.load(m_ptr + part + t, mask=keep_h, other=0.0, cache_modifier=".cg")
                    l_t = tl.load(l_ptr + part + t, mask=keep_h, other=0.0, cache_modifier=".cg")
                    acc_t = tl.load(acc_ptr + (part + t)[:, None] * HD + d[None, :], mask=keep_h[:, None], other=0.0,
                                    cache_modifier=".cg")
                    m_new = tl.maximum(m, m_t)
                    old, new = tl.exp(m - m_new), tl.exp(m_t - m_new)
                    l = l * old + l_t * new
                    acc = acc * old[:, None] + acc_t * new[:, None]
                    m = m_new
                tl.store(out_at, (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=keep_h[:, None])

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
        # y [N] = w [N, K] @ x [K] (+ b), a program per BLOCK_N outputs; products accumulate in
        # fp32 per lane and are summed at the end. SILU_MUL: x is a gate/up row [2K] and the
        # input is SiLU(gate) * up, rounded as `silu_mul` rounds it.
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        keep_n = n < N
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            cols = k0 + tl.arange(0, BLOCK_K)
            keep_k = cols < K
            w = tl.load(w_ptr + n[:, None].to(tl.int64) * K + cols[None, :], mask=keep_n[:, None] & keep_k[None, :],
                        other=0.0)
            if SILU_MUL:
                gate = tl.load(x_ptr + cols, mask=keep_k, other=0.0)
                up = tl.load(x_ptr + K + cols, mask=keep_k, other=0.0)
                g = gate.to(tl.float32)
                silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
                x = (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype).to(tl.float32)
            else:
                x = tl.load(x_ptr + cols, mask=keep_k, other=0.0).to(tl.float32)
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(b_ptr + n, mask=keep_n, other=0.0).to(tl.float32)
        tl.store(y_ptr + n, y.to(y_ptr.dtype.element_ty), mask=keep_n)

# -- dispatch ---------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor | None, eps: float) -> torch.Tensor:
    if not use_triton(x) or weights.dtype not in (x.dtype, torch.float32):
        return rms_norm_reference(x, weights, experts, eps)
    return _launch_rms_norm(x, None, weights, experts, eps)[1]


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weights: torch.Tensor, experts: torch.Tensor | None,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta)): the residual stream and the next sublayer's input.
    `delta` None (nothing pending: the first layer's input) gives (x, rms_norm(x))."""
    if delta is None:
        return x, rms_norm(x, weights, experts, eps)
    if (not use_triton(x) or delta.dtype != x.dtype or delta.shape != x.shape
            or weights.dtype not in (x.dtype, torch.float32)):
        return add_rms_norm_reference(x, delta, weights, experts, eps)
    return _launch_rms_norm(x, delta, weights, experts, eps)


def _launch_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weights: torch.Tensor, experts: torch.Tensor | None,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton norm over x's rows, after adding `delta` when given: (the sum or x, normed)."""
    w_fp32 = weights.dtype == torch.float32 and x.dtype != torch.float32
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    d2 = x2 if delta is None else delta.reshape(x2.shape).contiguous()  # unused pointer when HAS_D is false
    total = x2 if delta is None else torch.empty_like(x2)
    out = torch.empty(x2.shape, dtype=torch.float32 if w_fp32 else x.dtype, device=x.device)
    e = experts if experts is not None else x2  # unused pointer when HAS_E is false
    _rms_norm_kernel[(x2.shape[0],)](x2, d2, weights.contiguous(), e, total, out, x2.shape[1], eps,
                                     BLOCK=triton.next_power_of_2(x2.shape[1]), W_FP32=w_fp32,
                                     HAS_E=experts is not None, HAS_D=delta is not None)
    return total.view(x.shape), out.view(x.shape)


def qk_norm_rope(x: torch.Tensor, q_weights: torch.Tensor, k_weights: torch.Tensor, q_heads: int,
                 experts: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, eps: float, fp32: bool) -> torch.Tensor:
    """The QK-norm and RoPE of a token's q heads (the first `q_heads` of x's heads, normed with
    `q_weights`) and k heads (the rest, `k_weights`) in one launch: [B, N, heads, hd]."""
    if not use_triton(x) or x.dtype == torch.float32:
        return qk_norm_rope_reference(x, q_weights, k_weights, q_heads, experts, cos, sin, eps, fp32)
    B, N, H, HD = x.shape
    if x.stride(3) != 1 or x.stride(2) != HD or x.stride(0) != N * x.stride(1):
        x = x.contiguous()  # the kernel takes one stride per token row
    out = torch.empty(B, N, H, HD, dtype=x.dtype, device=x.device)
    e = experts if experts is not None else out
    _qk_norm_rope_kernel[(B * N,)](x, q_weights.contiguous(), k_weights.contiguous(), e, cos.contiguous(),
                                   sin.contiguous(), out, H, q_heads, x.stride(1), eps, HD=HD, HALF=HD // 2,
                                   HEADS=triton.next_power_of_2(H), FP32=fp32, HAS_E=experts is not None)
    return out


@dataclass(frozen=True)
class QKNormRope:
    """The QK-norm and RoPE of one layer call, for `qk_norm_rope` (all but the heads): the
    attention strategies apply it to the raw q/k heads, or hand it to the decode kernel,
    which applies it as it loads them."""

    q_weights: torch.Tensor
    k_weights: torch.Tensor
    q_heads: int
    experts: torch.Tensor | None
    cos: torch.Tensor
    sin: torch.Tensor
    eps: float
    fp32: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return qk_norm_rope(x, self.q_weights, self.k_weights, self.q_heads, self.experts, self.cos, self.sin, self.eps,
                            self.fp32)


def decode_attention(qk: torch.Tensor, v: torch.Tensor, norm: QKNormRope, keys: torch.Tensor, values: torch.Tensor,
                     write_at: torch.Tensor, arrived: torch.Tensor | None = None) -> torch.Tensor:
    """One decoding step's attention. qk [B, 1, heads + kv, hd] holds each sequence's raw q and
    k heads (before `norm`, their QK-norm and RoPE), v [B, 1, kv, hd] its value row. Sequence
    b's new key and value are written into its cache (keys, values [B, W, kv, hd], views of
    one layer's cache) at row `write_at[b]`, then its query attends over rows
    0..write_at[b]. Returns [B, 1, heads, hd]. `arrived`: zeroed int32 scratch of B * kv
    counters for the kernel (made here when None; `CachedKV` makes one for all layers of a
    step). Static shapes and no host reads (CUDA graphs)."""
    B, _, HQK, HD = qk.shape
    KV, W, H = v.shape[2], keys.shape[1], norm.q_heads
    fits = (use_triton(qk) and qk.dtype != torch.float32 and HD in (64, 128) and H % KV == 0 and HQK == H + KV
            and all(t.stride(3) == 1 and t.stride(2) == HD for t in (qk, v, keys)) and keys.stride() == values.stride()
            and norm.experts is None and norm.q_weights.shape[0] == norm.k_weights.shape[0] == 1
            and all(t.is_contiguous() for t in (norm.q_weights, norm.k_weights, norm.cos, norm.sin)))
    if not fits:
        qk = norm(qk)
        return decode_attention_reference(qk[:, :, :H], qk[:, :, H:], v, keys, values, write_at)
    block_n = 64
    # enough programs to keep the SMs busy at batch 1, few partials to merge at batch 32
    splits = max(1, min(triton.cdiv(W, block_n), triton.cdiv(256, B * KV)))
    chunk = triton.cdiv(triton.cdiv(W, splits), block_n) * block_n
    splits = triton.cdiv(W, chunk)
    out = torch.empty(B, 1, H, HD, dtype=qk.dtype, device=qk.device)
    acc = torch.empty(B * H * splits * HD if splits > 1 else 1, dtype=torch.float32, device=qk.device)
    m = torch.empty(B * H * splits, dtype=torch.float32, device=qk.device)
    l = torch.empty_like(m)
    if arrived is None:
        arrived = torch.zeros(B * KV, dtype=torch.int32, device=qk.device)
    _decode_attention_kernel[(B, KV, splits)](qk, v, norm.q_weights, norm.k_weights, norm.cos, norm.sin, keys, values,
                                              write_at, out, acc, m, l, arrived, qk.stride(0), v.stride(0),
                                              keys.stride(0), keys.stride(1), W, HD ** -0.5, norm.eps, chunk, splits,
                                              GROUP=H // KV, BLOCK_H=max(16, triton.next_power_of_2(H // KV)), HD=HD,
                                              HEADS=H, BLOCK_N=block_n, FP32=norm.fp32, ONE_SPLIT=splits == 1)
    return out


def _gemv_input(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """x as one contiguous row when the product should take the GEMV kernel (one row on the
    GPU: decoding at batch 1), else None. With more rows cuBLAS is faster (benchmarks/RESULTS.md)."""
    if not (use_triton(x) and x.dtype != torch.float32 and weight.dtype == x.dtype and weight.is_contiguous()
            and x.numel() == x.shape[-1] > 0):
        return None
    return x.reshape(-1).contiguous()


def _gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu_mul: bool) -> torch.Tensor:
    N, K = weight.shape
    block_n = 4 if K > 8192 else 8  # tuned on the decode shapes of the 7B model (H100, H200)
    y = torch.empty(N, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(N, block_n),)](x, weight, bias if bias is not None else weight, y, N, K,
                                              HAS_BIAS=bias is not None, SILU_MUL=silu_mul, BLOCK_N=block_n,
                                              BLOCK_K=512, STAGES=3, num_warps=4)
    return y


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; a single row on the GPU takes the GEMV kernel."""
    row = _gemv_input(x, weight)
    if row is None or (bias is not None and bias.dtype != x.dtype):
        return F.linear(x, weight, bias)
    return _gemv(row, weight, bias, silu_mul=False).view(*x.shape[:-1], weight.shape[0])


def silu_mul_linear(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(silu_mul(gate_up), weight): the MLP's down projection. A single row on the
    GPU takes the GEMV kernel, which computes the SiLU-mul as it reads its input."""
    row = _gemv_input(gate_up, weight)
    if row is None:
        return F.linear(silu_mul(gate_up), weight)
    return _gemv(row, weight, None, silu_mul=True).view(*gate_up.shape[:-1], weight.shape[0])


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if not use_triton(gate_up) or gate_up.dtype == torch.float32:
        return silu_mul_reference(gate_up)
    n = gate_up.shape[-1] // 2
    gu = gate_up.reshape(-1, 2 * n).contiguous()
    out = torch.empty(gu.shape[0], n, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(gu.shape[0], triton.cdiv(n, block))](gu, out, n, BLOCK=block)
    return out.view(*gate_up.shape[:-1], n)
