"""The decode-attention kernel against the eager reference (GPU only; the CPU always runs the reference,
which the golden tests cover)."""

from __future__ import annotations

import pytest
import torch

from bagel_ray.model import kernels
from bagel_ray.model.kernels.decode_attention import decode_attention, decode_attention_reference
from bagel_ray.model.kernels.rope import QKNormRope
from tests.model.kernels import cuda


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
    norm = QKNormRope(wq, wk, H, None, cos, sin, 1e-6, False)
    cache = torch.randn(2, 2, batch, width, KV, HD, device="cuda", dtype=torch.bfloat16, generator=g)
    at = torch.tensor(write_at, device="cuda")
    mine, ref = cache.clone(), cache.clone()
    got = decode_attention(qk, v, norm, mine[1, 0], mine[1, 1], at)
    with kernels.eager():
        want = decode_attention(qk, v, norm, ref[1, 0], ref[1, 1], at)
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
    exact = decode_attention_reference(normed[:, :, :H].float(), normed[:, :, H:].float(), v.float(),
                                               ref[1, 0].float(), ref[1, 1].float(), at)
    err, sdpa_err = (got.float() - exact).abs(), (want.float() - exact).abs()
    assert err.max() <= 2 * sdpa_err.max() + 2e-3 and err.mean() <= 2 * sdpa_err.mean() + 1e-4
