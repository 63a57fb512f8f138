"""The fused Triton kernels against the eager references (GPU only; the CPU always runs the
references, which the golden tests cover)."""

from __future__ import annotations

import pytest
import torch

from bagel_ray.model import kernels

cuda = pytest.mark.skipif(not torch.cuda.is_available() or kernels.triton is None, reason="needs a CUDA GPU and Triton")


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bf16/fp16 steps apart two tensors are, elementwise (relative to |b|)."""
    step = torch.finfo(b.dtype).eps * b.float().abs().clamp_min(1e-3)
    return (a.float() - b.float()).abs() / step


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("experts", [False, True])
def test_rms_norm(dtype, experts):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(3, 257, 3584, device="cuda", dtype=dtype, generator=g) * 3
    w = (1 + 0.1 * torch.randn(2, 3584, device="cuda", generator=g)).to(dtype)
    e = torch.randint(0, 2, (3 * 257,), device="cuda", generator=g, dtype=torch.int32) if experts else None
    got = kernels.rms_norm(x, w, e, 1e-6)
    with kernels.eager():
        want = kernels.rms_norm(x, w, e, 1e-6)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert (ulps_apart(got, want) <= 2).float().mean() > 0.999
    assert torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@cuda
@pytest.mark.parametrize("experts", [False, True])
def test_add_rms_norm(experts):
    g = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(2, 300, 3584, device="cuda", dtype=torch.bfloat16, generator=g) * 3
    d = torch.randn(2, 300, 3584, device="cuda", dtype=torch.bfloat16, generator=g)
    w = (1 + 0.1 * torch.randn(2, 3584, device="cuda", generator=g)).to(torch.bfloat16)
    e = torch.randint(0, 2, (600,), device="cuda", generator=g, dtype=torch.int32) if experts else None
    total, normed = kernels.add_rms_norm(x, d, w, e, 1e-6)
    with kernels.eager():
        want_total, want = kernels.add_rms_norm(x, d, w, e, 1e-6)
    assert torch.equal(total, want_total)  # the add rounds once, as the eager add
    assert (ulps_apart(normed, want) <= 2).float().mean() > 0.999


@cuda
@pytest.mark.parametrize("fp32", [False, True])
@pytest.mark.parametrize("heads", [28, 4])
def test_qk_norm_rope(fp32, heads):
    from bagel_ray.model.llm import rope_cos_sin, rope_inv_freq

    g = torch.Generator(device="cuda").manual_seed(1)
    # a strided view, as the layer passes q and k out of the fused qkv projection
    x = (torch.randn(2, 300, heads * 128 + 256, device="cuda", dtype=torch.bfloat16, generator=g) * 2)[..., : heads * 128]
    x = x.unflatten(-1, (heads, 128))
    w = (1 + 0.1 * torch.randn(2, 128, device="cuda", generator=g)).to(torch.bfloat16)
    e = torch.randint(0, 2, (600,), device="cuda", generator=g, dtype=torch.int32)
    positions = torch.randint(0, 5000, (2, 300), device="cuda", generator=g)
    cos, sin = rope_cos_sin(positions, rope_inv_freq(128, 1e6), torch.bfloat16)
    got = kernels.qk_norm_rope(x, w, e, cos, sin, 1e-6, fp32)
    with kernels.eager():
        want = kernels.qk_norm_rope(x, w, e, cos, sin, 1e-6, fp32)
    assert got.dtype == want.dtype == torch.bfloat16
    # RoPE's sum can cancel: count steps at the scale of the operands (~1), not of the result
    step = torch.finfo(torch.bfloat16).eps * want.float().abs().clamp_min(1.0)
    assert ((got.float() - want.float()).abs() <= 2 * step).float().mean() > 0.999
    assert torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@cuda
def test_silu_mul():
    g = torch.Generator(device="cuda").manual_seed(2)
    gu = torch.randn(1000, 2 * 18944, device="cuda", dtype=torch.bfloat16, generator=g) * 3
    got = kernels.silu_mul(gu)
    with kernels.eager():
        want = kernels.silu_mul(gu)
    assert (ulps_apart(got, want) <= 2).float().mean() > 0.999


@cuda
def test_offsets_past_two_to_the_31():
    """A DiT batch of 8 requests at 1024^2 has 65k rows: rows x 2 x 18944 gate/up elements
    pass 2^31, so the kernels index in 64 bits (the rows past the limit are checked)."""
    rows = 2**31 // (2 * 18944) + 64
    gu = torch.zeros(rows, 2 * 18944, device="cuda", dtype=torch.bfloat16)
    gu[-64:] = torch.randn(64, 2 * 18944, device="cuda", generator=torch.Generator(device="cuda").manual_seed(3)).bfloat16()
    got = kernels.silu_mul(gu)[-64:]
    with kernels.eager():
        want = kernels.silu_mul(gu[-64:])
    assert (ulps_apart(got, want) <= 2).float().mean() > 0.999
