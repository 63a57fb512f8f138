"""What every kernel family's dispatch shares (`bagel_ray.model.kernels`): the reason a kernel
cannot run, and a fallback to the reference logged once per family and reason on a GPU."""

from __future__ import annotations

import logging

import torch

from bagel_ray.model import kernels
from bagel_ray.model.kernels.norm import rms_norm, rms_norm_reference
from tests.model.kernels import cuda


def test_on_the_cpu_the_reference_is_the_path_and_nothing_is_logged(caplog):
    x = torch.randn(3, 8)
    assert kernels.unsupported(x) in ("not on a GPU", "Triton is not installed")
    with caplog.at_level(logging.INFO, logger="bagel_ray.model.kernels"):
        assert kernels.fall_back("rms_norm", x, kernels.unsupported(x)) is True
        assert kernels.fall_back("rms_norm", x, None) is False
        w = torch.randn(1, 8)
        assert torch.equal(rms_norm(x, w, None, 1e-6), rms_norm_reference(x, w, None, 1e-6))
    assert caplog.records == []
    with kernels.eager():
        assert kernels.unsupported(x) in ("inside eager()", "Triton is not installed")


@cuda
def test_a_fallback_on_the_gpu_is_logged_once_per_reason(caplog):
    x = torch.randn(3, 8, device="cuda")
    with caplog.at_level(logging.INFO, logger="bagel_ray.model.kernels"):
        for _ in range(3):
            assert kernels.fall_back("test_family", x, "a made-up reason")
        assert kernels.fall_back("test_family", x, "another reason")
        with kernels.eager():
            assert kernels.fall_back("test_family", x, "inside eager()")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "a made-up reason" in messages[0] and "another reason" in messages[1]
