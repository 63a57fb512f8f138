"""The RMSNorm kernels (`rms_norm`, `add_rms_norm`) against the eager reference (GPU only; the CPU always runs the reference,
which the golden tests cover)."""

from __future__ import annotations

import pytest
import torch

from bagel_ray.model import kernels
from bagel_ray.model.kernels.norm import add_rms_norm, rms_norm
from tests.model.kernels import cuda, ulps_apart


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("experts", [False, True])
def test_rms_norm(dtype, experts):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(3, 257, 3584, device="cuda", dtype=dtype, generator=g) * 3
    w = (1 + 0.1 * torch.randn(2, 3584, device="cuda", generator=g)).to(dtype)
    e = torch.randint(0, 2, (3 * 257,), device="cuda", generator=g, dtype=torch.int32) if experts else None
    got = rms_norm(x, w, e, 1e-6)
    with kernels.eager():
        want = rms_norm(x, w, e, 1e-6)
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
    total, normed = add_rms_norm(x, d, w, e, 1e-6)
    with kernels.eager():
        want_total, want = add_rms_norm(x, d, w, e, 1e-6)
    assert torch.equal(total, want_total)  # the add rounds once, as the eager add
    assert (ulps_apart(normed, want) <= 2).float().mean() > 0.999
