"""Fused elementwise kernels of the decoder layer, with the reference's rounding order.

On a CUDA device with Triton these run as single Triton kernels (one read and one write of
each tensor instead of the half-dozen passes of the eager PyTorch ops); elsewhere the eager
reference below runs. Both follow the official code's casts (spec 11.2-11.4):

- `rms_norm`: statistics in fp32, the normalised value cast to the input dtype, then times
  the weight (the product promotes like PyTorch's, fp32 if either operand is fp32).
- `qk_norm_rope`: the per-head QK-norm followed by rotate-half RoPE. `fp32` reproduces the
  generation path (q/k upcast before the norm, RoPE in fp32 with bf16 cos/sin, one final
  cast); otherwise every step rounds to the input dtype as the understanding path does.
- `silu_mul`: SiLU(gate) * up of the fused gate/up projection.
- `add_rms_norm`: the residual add (rounded to the input dtype, as the eager add) and the
  RMSNorm of the sum, in one pass: returns both, the sum for the next residual.
"""

from __future__ import annotations

from contextlib import contextmanager
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


def _use_triton(x: torch.Tensor) -> bool:
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


def qk_norm_rope_reference(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor | None, cos: torch.Tensor,
                           sin: torch.Tensor, eps: float, fp32: bool) -> torch.Tensor:
    """x [B, N, heads, hd]; weights [E, hd]; experts [B*N] or None; cos/sin [B, N, hd] in the
    sequence dtype. Returns x's dtype."""
    dtype = x.dtype
    B, N, H, hd = x.shape
    per_head = None if experts is None else experts.repeat_interleave(H)
    h = rms_norm_reference(x.float() if fp32 else x, weights, per_head, eps)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return (h * cos + rotate_half(h) * sin).to(dtype)


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
    def _qk_norm_rope_kernel(x_ptr, w_ptr, e_ptr, cos_ptr, sin_ptr, out_ptr, heads, row_stride, eps,
                             HD: tl.constexpr, HALF: tl.constexpr, HEADS: tl.constexpr, FP32: tl.constexpr,
                             HAS_E: tl.constexpr):
        # one program per token: all its heads as a [HEADS, HALF] tile for each half of the
        # head dim; cos/sin and the expert are per token. x rows may be strided (a view into
        # the fused qkv output); the output is contiguous.
        token = tl.program_id(0).to(tl.int64)
        expert = tl.load(e_ptr + token).to(tl.int64) if HAS_E else 0
        h = tl.arange(0, HEADS)[:, None]
        lo = tl.arange(0, HALF)[None, :]
        keep = h < heads
        src = x_ptr + token * row_stride + h * HD + lo
        x_lo = tl.load(src, mask=keep, other=0.0)
        x_hi = tl.load(src + HALF, mask=keep, other=0.0)
        dtype = x_lo.dtype
        a = x_lo.to(tl.float32)
        b = x_hi.to(tl.float32)
        rstd = tl.rsqrt((tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)) / HD + eps)[:, None]
        w_lo = tl.load(w_ptr + expert * HD + lo).to(tl.float32)
        w_hi = tl.load(w_ptr + expert * HD + HALF + lo).to(tl.float32)
        c_lo = tl.load(cos_ptr + token * HD + lo).to(tl.float32)
        c_hi = tl.load(cos_ptr + token * HD + HALF + lo).to(tl.float32)
        s_lo = tl.load(sin_ptr + token * HD + lo).to(tl.float32)
        s_hi = tl.load(sin_ptr + token * HD + HALF + lo).to(tl.float32)
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
        dst = out_ptr + token * heads * HD + h * HD + lo
        tl.store(dst, out_lo.to(dtype), mask=keep)
        tl.store(dst + HALF, out_hi.to(dtype), mask=keep)

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


# -- dispatch ---------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor | None, eps: float) -> torch.Tensor:
    if not _use_triton(x) or weights.dtype not in (x.dtype, torch.float32):
        return rms_norm_reference(x, weights, experts, eps)
    return _launch_rms_norm(x, None, weights, experts, eps)[1]


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weights: torch.Tensor, experts: torch.Tensor | None,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta)): the residual stream and the next sublayer's input.
    `delta` None (nothing pending: the first layer's input) gives (x, rms_norm(x))."""
    if delta is None:
        return x, rms_norm(x, weights, experts, eps)
    if (not _use_triton(x) or delta.dtype != x.dtype or delta.shape != x.shape
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


def qk_norm_rope(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor | None, cos: torch.Tensor,
                 sin: torch.Tensor, eps: float, fp32: bool) -> torch.Tensor:
    if not _use_triton(x) or x.dtype == torch.float32:
        return qk_norm_rope_reference(x, weights, experts, cos, sin, eps, fp32)
    B, N, H, HD = x.shape
    if x.stride(3) != 1 or x.stride(2) != HD or x.stride(0) != N * x.stride(1):
        x = x.contiguous()  # the kernel takes one stride per token row
    out = torch.empty(B, N, H, HD, dtype=x.dtype, device=x.device)
    e = experts if experts is not None else out
    _qk_norm_rope_kernel[(B * N,)](x, weights.contiguous(), e, cos.contiguous(), sin.contiguous(), out, H, x.stride(1), eps,
                                   HD=HD, HALF=HD // 2, HEADS=triton.next_power_of_2(H), FP32=fp32,
                                   HAS_E=experts is not None)
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if not _use_triton(gate_up) or gate_up.dtype == torch.float32:
        return silu_mul_reference(gate_up)
    n = gate_up.shape[-1] // 2
    gu = gate_up.reshape(-1, 2 * n).contiguous()
    out = torch.empty(gu.shape[0], n, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(gu.shape[0], triton.cdiv(n, block))](gu, out, n, BLOCK=block)
    return out.view(*gate_up.shape[:-1], n)
