"""The GEMV kernel (`linear`, `silu_mul_linear` of one row) against the eager reference (GPU only; the CPU always runs the reference,
which the golden tests cover)."""

from __future__ import annotations

import pytest
import torch

from bagel_ray.model.kernels.gemv import linear, silu_mul_linear
from bagel_ray.model.kernels.silu_mul import silu_mul
from tests.model.kernels import cuda


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
        (linear(x, w, b), F.linear(x, w, b), F.linear(x.float(), w.float(), b.float())),
        (silu_mul_linear(gate_up, w), F.linear(silu_mul(gate_up), w),
         F.linear(silu_mul(gate_up).float(), w.float())),
    ):
        assert got.shape == want.shape and got.dtype == torch.bfloat16
        err, cublas_err = (got.float() - exact).abs(), (want.float() - exact).abs()
        assert err.max() <= 2 * cublas_err.max() and err.mean() <= 1.5 * cublas_err.mean()
