"""The decode-attention family: one decoding step's attention over a preallocated cache
(`decode_attention`): writes the new K/V row of each sequence, then its query attends over the
rows up to it. The reference is `index_put_` and SDPA under an additive mask over the whole
cache width; the kernel reads only the rows a sequence has (split over the rows,
flash-decoding style, the last split to finish merging them), applies the QK-norm and RoPE to
the raw q/k heads itself and writes the new row: one launch a layer instead of seven, and no
read of the empty rest of a slot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bagel_ray.model.kernels import fall_back, triton, unsupported
from bagel_ray.model.kernels.rope import QKNormRope

if triton is not None:  # pragma: no cover - GPU machines
    import triton.language as tl

    from bagel_ray.model.kernels.rope import _norm_rope


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


if triton is not None:  # pragma: no cover - compiled on GPU machines only
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
    fits = (qk.dtype != torch.float32 and HD in (64, 128) and H % KV == 0 and HQK == H + KV
            and all(t.stride(3) == 1 and t.stride(2) == HD for t in (qk, v, keys)) and keys.stride() == values.stride()
            and norm.experts is None and norm.q_weights.shape[0] == norm.k_weights.shape[0] == 1
            and all(t.is_contiguous() for t in (norm.q_weights, norm.k_weights, norm.cos, norm.sin)))
    why = unsupported(qk) or (None if fits else f"no kernel for {qk.dtype}, head dim {HD}, {H} q / {KV} kv heads, "
                                                  "these strides or per-row experts")
    if fall_back("decode_attention", qk, why):
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
