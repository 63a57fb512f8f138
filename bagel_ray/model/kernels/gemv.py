"""The GEMV family: `linear` / `silu_mul_linear` for a single row (decoding at batch 1) as a
Triton GEMV, which streams the weights 8-13 % faster than cuBLAS's kernels on the 7B decode
shapes (H100); the down projection takes the SiLU-mul of its gate/up input on the fly. More
rows go to F.linear (cuBLAS is faster there: that is the choice, not a fallback), as does
everything on the CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bagel_ray.model.kernels import fall_back, triton, unsupported
from bagel_ray.model.kernels.silu_mul import silu_mul

if triton is not None:  # pragma: no cover - GPU machines
    import triton.language as tl


if triton is not None:  # pragma: no cover - compiled on GPU machines only
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


def _gemv_input(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """x as one contiguous row when the product should take the GEMV kernel (one row on the
    GPU: decoding at batch 1), else None. With more rows cuBLAS is faster (benchmarks/RESULTS.md)."""
    if x.numel() != x.shape[-1] or x.numel() == 0:
        return None  # more rows: cuBLAS, by choice
    why = unsupported(x) or ("no kernel for fp32 inputs" if x.dtype == torch.float32 else None) or (
        None if weight.dtype == x.dtype and weight.is_contiguous() else f"weight {weight.dtype}, contiguous "
        f"{weight.is_contiguous()}, x {x.dtype}")
    return None if fall_back("gemv", x, why) else x.reshape(-1).contiguous()


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
