"""The SiLU-mul family: `silu_mul`, SiLU(gate) * up of the fused gate/up projection, rounded
as the official code rounds it. One Triton kernel on a GPU (not for fp32 inputs); the eager
reference elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bagel_ray.model.kernels import fall_back, triton, unsupported

if triton is not None:  # pragma: no cover - GPU machines
    import triton.language as tl


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up




if triton is not None:  # pragma: no cover - compiled on GPU machines only
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


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    why = unsupported(gate_up) or ("no kernel for fp32 inputs" if gate_up.dtype == torch.float32 else None)
    if fall_back("silu_mul", gate_up, why):
        return silu_mul_reference(gate_up)
    n = gate_up.shape[-1] // 2
    gu = gate_up.reshape(-1, 2 * n).contiguous()
    out = torch.empty(gu.shape[0], n, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(gu.shape[0], triton.cdiv(n, block))](gu, out, n, BLOCK=block)
    return out.view(*gate_up.shape[:-1], n)
