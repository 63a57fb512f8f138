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
    got = kernels.qk_norm_rope(x, wq, wk, nq, e, cos, sin, 1e-6, fp32)
    with kernels.eager():
        want = kernels.qk_norm_rope(x, wq, wk, nq, e, cos, sin, 1e-6, fp32)
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape == x.shape
    # RoPE's sum can cancel: count steps at the scale of the operands (~1), not of the result
    step = torch.finfo(torch.bfloat16).eps * want.float().abs().clamp_min(1.0)
    assert ((got.float() - want.float()).abs() <= 2 * step).float().mean() > 0.999
    assert torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@cuda
@pytest.mark.parametrize("batch,width,write_at", [(1, 100, [37]), (1, 2048, [0]), (1, 2048, [1500]),
                                                  (3, 2048, [5, 2047, 700]), (32, 2048, list(range(0, 2048, 64)))])
def test_decode_attention(batch, width, write_at):
    """The decode kernel (QK-norm and RoPE of the raw q/k heads, the new row written where
    `index_put_` writes it, attention over rows 0..write_at split over the rows and merged)
    against the eager path, with views as the layer passes them: q/k/v of one qkv row, one
    layer of a [layers, 2, B, W, kv, hd] cache."""
    from bagel_ray.model.llm import rope_cos_sin, rope_inv_freq

    g = torch.Generator(device="cuda").manual_seed(5)
    H, KV, HD = 28, 4, 128
    qkv = torch.randn(batch, 1, (H + 2 * KV) * HD, device="cuda", dtype=torch.bfloat16, generator=g) * 3
    qk = qkv[..., : (H + KV) * HD].unflatten(-1, (H + KV, HD))
    v = qkv[..., (H + KV) * HD :].unflatten(-1, (KV, HD))
    wq, wk = ((1 + 0.1 * torch.randn(1, HD, device="cuda", generator=g)).to(torch.bfloat16) for _ in range(2))
    cos, sin = rope_cos_sin(torch.tensor(write_at, device="cuda")[:, None] + 7, rope_inv_freq(HD, 1e6), torch.bfloat16)
    norm = kernels.QKNormRope(wq, wk, H, None, cos, sin, 1e-6, False)
    cache = torch.randn(2, 2, batch, width, KV, HD, device="cuda", dtype=torch.bfloat16, generator=g)
    at = torch.tensor(write_at, device="cuda")
    mine, ref = cache.clone(), cache.clone()
    got = kernels.decode_attention(qk, v, norm, mine[1, 0], mine[1, 1], at)
    with kernels.eager():
        want = kernels.decode_attention(qk, v, norm, ref[1, 0], ref[1, 1], at)
    assert got.shape == want.shape == (batch, 1, H, HD)
    # the same rows written (k through the fused norm: within 2 bf16 steps), nothing else touched
    written = torch.zeros_like(cache, dtype=torch.bool)
    written[1, :, torch.arange(batch, device="cuda"), at] = True
    assert torch.equal(mine[~written], ref[~written])
    step = torch.finfo(torch.bfloat16).eps * ref[written].float().abs().clamp_min(1.0)  # RoPE's sum can cancel
    assert ((mine[written].float() - ref[written].float()).abs() <= 2 * step).float().mean() > 0.999
    # against the exact (fp32) attention over the eager path's bf16 q/k/v: as close as SDPA's
    with kernels.eager():
        normed = norm(qk)
    exact = kernels.decode_attention_reference(normed[:, :, :H].float(), normed[:, :, H:].float(), v.float(),
                                               ref[1, 0].float(), ref[1, 1].float(), at)
    err, sdpa_err = (got.float() - exact).abs(), (want.float() - exact).abs()
    assert err.max() <= 2 * sdpa_err.max() + 2e-3 and err.mean() <= 2 * sdpa_err.mean() + 1e-4


@cuda
@pytest.mark.parametrize("shape", [(4608, 3584), (3584, 18944), (152064, 3584)])
def test_gemv(shape):
    """The one-row GEMV (with bias; and fused with the SiLU-mul of a gate/up input) against
    cuBLAS, both measured against the fp32 product of the same bf16 inputs."""
    import torch.nn.functional as F

    g = torch.Generator(device="cuda").manual_seed(6)
    n, k = shape
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=g)
    x = torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16, generator=g)
    gate_up = torch.randn(1, 2 * k, device="cuda", dtype=torch.bfloat16, generator=g) * 2
    for got, want, exact in (
        (kernels.linear(x, w, b), F.linear(x, w, b), F.linear(x.float(), w.float(), b.float())),
        (kernels.silu_mul_linear(gate_up, w), F.linear(kernels.silu_mul(gate_up), w),
         F.linear(kernels.silu_mul(gate_up).float(), w.float())),
    ):
        assert got.shape == want.shape and got.dtype == torch.bfloat16
        err, cublas_err = (got.float() - exact).abs(), (want.float() - exact).abs()
        assert err.max() <= 2 * cublas_err.max() and err.mean() <= 1.5 * cublas_err.mean()


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
