"""The QK-norm and RoPE kernel against the eager reference (GPU only; the CPU always runs the reference,
which the golden tests cover)."""

from __future__ import annotations

import pytest
import torch

from bagel_ray.model import kernels
from bagel_ray.model.kernels.rope import qk_norm_rope
from tests.model.kernels import cuda


@cuda
@pytest.mark.parametrize("fp32", [False, True])
@pytest.mark.parametrize("heads", [(28, 4), (4, 4)])
def test_qk_norm_rope(fp32, heads):
    from bagel_ray.model.llm import rope_cos_sin, rope_inv_freq

    nq, nk = heads
    g = torch.Generator(device="cuda").manual_seed(1)
    # a strided view, as the layer passes q and k out of the fused qkv projection
    x = (torch.randn(2, 300, (nq + nk) * 128 + 512, device="cuda", dtype=torch.bfloat16, generator=g) * 2)
    x = x[..., : (nq + nk) * 128].unflatten(-1, (nq + nk, 128))
    wq, wk = ((1 + 0.1 * torch.randn(2, 128, device="cuda", generator=g)).to(torch.bfloat16) for _ in range(2))
    e = torch.randint(0, 2, (600,), device="cuda", generator=g, dtype=torch.int32)
    positions = torch.randint(0, 5000, (2, 300), device="cuda", generator=g)
    cos, sin = rope_cos_sin(positions, rope_inv_freq(128, 1e6), torch.bfloat16)
    got = qk_norm_rope(x, wq, wk, nq, e, cos, sin, 1e-6, fp32)
    with kernels.eager():
        want = qk_norm_rope(x, wq, wk, nq, e, cos, sin, 1e-6, fp32)
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape == x.shape
    # RoPE's sum can cancel: count steps at the scale of the operands (~1), not of the result
    step = torch.finfo(torch.bfloat16).eps * want.float().abs().clamp_min(1.0)
    assert ((got.float() - want.float()).abs() <= 2 * step).float().mean() > 0.999
    assert torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2)
