"""Shared by the kernel tests: the GPU marker and the distance in rounding steps."""

from __future__ import annotations

import pytest
import torch

from bagel_ray.model import kernels

cuda = pytest.mark.skipif(not torch.cuda.is_available() or kernels.triton is None, reason="needs a CUDA GPU and Triton")


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bf16/fp16 steps apart two tensors are, elementwise (relative to |b|)."""
    step = torch.finfo(b.dtype).eps * b.float().abs().clamp_min(1e-3)
    return (a.float() - b.float()).abs() / step
