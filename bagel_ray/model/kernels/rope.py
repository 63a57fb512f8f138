"""The QK-norm and RoPE family: `qk_norm_rope`, the per-head QK-norm followed by rotate-half
RoPE, of the q heads and the k heads of a token in one call (each with its own norm weight).
`fp32` reproduces the generation path (q/k upcast before the norm, RoPE in fp32 with bf16
cos/sin, one final cast); otherwise every step rounds to the input dtype as the understanding
path does (spec 11.3). `QKNormRope` carries one layer call's arguments to the attention
strategies and to the decode-attention kernel, which applies it as it loads q and k
(`_norm_rope`, shared with that kernel). One Triton kernel on a GPU (not for fp32 inputs);
the eager reference elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bagel_ray.model.kernels import fall_back, triton, unsupported
from bagel_ray.model.kernels.norm import rms_norm_reference

if triton is not None:  # pragma: no cover - GPU machines
    import triton.language as tl


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (spec 3.4). x: [B, N, heads, head_dim]; cos/sin: [B, N, head_dim]."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin


def _qk_norm_rope_heads(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor | None, cos: torch.Tensor,
                        sin: torch.Tensor, eps: float, fp32: bool) -> torch.Tensor:
    dtype = x.dtype
    B, N, H, hd = x.shape
    per_head = None if experts is None else experts.repeat_interleave(H)
    h = rms_norm_reference(x.float() if fp32 else x, weights, per_head, eps)
    return apply_rope(h, cos, sin).to(dtype)


def qk_norm_rope_reference(x: torch.Tensor, q_weights: torch.Tensor, k_weights: torch.Tensor, q_heads: int,
                           experts: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, eps: float,
                           fp32: bool) -> torch.Tensor:
    """x [B, N, heads, hd]: the first `q_heads` heads normed with `q_weights` [E, hd], the rest
    with `k_weights`; experts [B*N] or None; cos/sin [B, N, hd] in the sequence dtype.
    Returns x's dtype, contiguous."""
    q = _qk_norm_rope_heads(x[:, :, :q_heads], q_weights, experts, cos, sin, eps, fp32)
    k = _qk_norm_rope_heads(x[:, :, q_heads:], k_weights, experts, cos, sin, eps, fp32)
    return torch.cat((q, k), dim=2)


if triton is not None:  # pragma: no cover - compiled on GPU machines only
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


def qk_norm_rope(x: torch.Tensor, q_weights: torch.Tensor, k_weights: torch.Tensor, q_heads: int,
                 experts: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, eps: float, fp32: bool) -> torch.Tensor:
    """The QK-norm and RoPE of a token's q heads (the first `q_heads` of x's heads, normed with
    `q_weights`) and k heads (the rest, `k_weights`) in one launch: [B, N, heads, hd]."""
    why = unsupported(x) or ("no kernel for fp32 inputs" if x.dtype == torch.float32 else None)
    if fall_back("qk_norm_rope", x, why):
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
