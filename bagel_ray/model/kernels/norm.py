"""The RMSNorm family: `rms_norm`, and `add_rms_norm` (the residual add, rounded to the input
dtype as the eager add, and the RMSNorm of the sum in one pass: returns both, the sum for the
next residual). Statistics in fp32, the normalised value cast to the input dtype, then times
the weight (the product promotes like PyTorch's, fp32 if either operand is fp32), as the
official code (spec 11.2). One Triton kernel on a GPU; the eager reference elsewhere.
"""

from __future__ import annotations

import torch

from bagel_ray.model.kernels import fall_back, triton, unsupported

if triton is not None:  # pragma: no cover - GPU machines
    import triton.language as tl


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


def rms_norm(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor | None, eps: float) -> torch.Tensor:
    why = unsupported(x) or _weights_unsupported(x, weights)
    if fall_back("rms_norm", x, why):
        return rms_norm_reference(x, weights, experts, eps)
    return _launch_rms_norm(x, None, weights, experts, eps)[1]


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weights: torch.Tensor, experts: torch.Tensor | None,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta)): the residual stream and the next sublayer's input.
    `delta` None (nothing pending: the first layer's input) gives (x, rms_norm(x))."""
    if delta is None:
        return x, rms_norm(x, weights, experts, eps)
    why = (unsupported(x) or _weights_unsupported(x, weights)
           or (f"delta {delta.dtype} {list(delta.shape)} differs from x" if (delta.dtype, delta.shape) != (x.dtype, x.shape)
               else None))
    if fall_back("add_rms_norm", x, why):
        return add_rms_norm_reference(x, delta, weights, experts, eps)
    return _launch_rms_norm(x, delta, weights, experts, eps)


def _weights_unsupported(x: torch.Tensor, weights: torch.Tensor) -> str | None:
    return None if weights.dtype in (x.dtype, torch.float32) else f"weights in {weights.dtype}, x in {x.dtype}"


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
