"""The VAE's GroupNorm(+swish) kernel against the eager reference (GPU only), and the CPU path
being the reference itself (the official numerics, which the golden tests hold)."""

from __future__ import annotations

import pytest
import torch

from bagel_ray.model.kernels.group_norm import group_norm, group_norm_reference
from tests.model.kernels import cuda


def _norm(channels: int, seed: int, device: str = "cpu") -> torch.nn.GroupNorm:
    norm = torch.nn.GroupNorm(32, channels, eps=1e-6).to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(channels, device=device, generator=g))
        norm.bias.copy_(0.3 * torch.randn(channels, device=device, generator=g))
    return norm


@pytest.mark.parametrize("then_swish", [False, True])
def test_cpu_runs_the_official_ops(then_swish):
    norm = _norm(64, 0)
    x = torch.randn(2, 64, 9, 7, generator=torch.Generator().manual_seed(1)) * 2 + 5
    want = norm(x)
    if then_swish:
        want = want * torch.sigmoid(want)
    assert torch.equal(group_norm(x, norm, then_swish), want)


@cuda
@pytest.mark.parametrize("then_swish", [False, True])
@pytest.mark.parametrize("shape", [(1, 128, 256, 256), (2, 512, 33, 47), (1, 64, 3, 5), (1, 256, 512, 512)])
def test_group_norm_fp32(shape, then_swish):
    norm = _norm(shape[1], 2, "cuda")
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(shape, device="cuda", generator=g) * 4 + 30  # a large mean: the shifted sums keep the variance
    got = group_norm(x, norm, then_swish)
    want = group_norm_reference(x, norm, then_swish)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@cuda
def test_group_norm_bf16():
    norm = _norm(256, 4, "cuda").to(torch.bfloat16)
    x = torch.randn(1, 256, 64, 64, device="cuda", dtype=torch.bfloat16, generator=torch.Generator(device="cuda").manual_seed(5))
    got = group_norm(x, norm, then_swish=True)
    want = group_norm_reference(x, norm, then_swish=True)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
