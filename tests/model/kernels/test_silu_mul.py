"""The SiLU-mul kernel against the eager reference (GPU only; the CPU always runs the reference,
which the golden tests cover)."""

from __future__ import annotations

import torch

from bagel_ray.model import kernels
from bagel_ray.model.kernels.silu_mul import silu_mul
from tests.model.kernels import cuda, ulps_apart


@cuda
def test_silu_mul():
    g = torch.Generator(device="cuda").manual_seed(2)
    gu = torch.randn(1000, 2 * 18944, device="cuda", dtype=torch.bfloat16, generator=g) * 3
    got = silu_mul(gu)
    with kernels.eager():
        want = silu_mul(gu)
    assert (ulps_apart(got, want) <= 2).float().mean() > 0.999


@cuda
def test_offsets_past_two_to_the_31():
    """A DiT batch of 8 requests at 1024^2 has 65k rows: rows x 2 x 18944 gate/up elements
    pass 2^31, so the kernels index in 64 bits (the rows past the limit are checked)."""
    rows = 2**31 // (2 * 18944) + 64
    gu = torch.zeros(rows, 2 * 18944, device="cuda", dtype=torch.bfloat16)
    gu[-64:] = torch.randn(64, 2 * 18944, device="cuda", generator=torch.Generator(device="cuda").manual_seed(3)).bfloat16()
    got = silu_mul(gu)[-64:]
    with kernels.eager():
        want = silu_mul(gu[-64:])
    assert (ulps_apart(got, want) <= 2).float().mean() > 0.999
