"""`attention.attend`: the bottom-right causal mask, and on a GPU the flash kernel for
`flash=True` calls (no per-length plan), with the masked call's results."""

from __future__ import annotations

import pytest
import torch

from bagel_ray.model.attention import attend, bottom_right_causal


def _qkv(b: int, nq: int, nk: int, heads: int = 4, kv: int = 2, d: int = 16, dtype=torch.float32, device="cpu"):
    g = torch.Generator(device=device).manual_seed(0)
    return tuple(torch.randn(b, h, n, d, generator=g, device=device).to(dtype) for h, n in ((heads, nq), (kv, nk), (kv, nk)))


def _exact(q, k, v, mask):
    """Attention in float64 with K/V heads repeated for their query groups."""
    q, k, v = (t.double() for t in (q, k, v))
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def test_bottom_right_causal():
    assert bottom_right_causal(2, 4, torch.device("cpu")).tolist() == [[True, True, True, False], [True, True, True, True]]
    assert torch.equal(bottom_right_causal(3, 3, torch.device("cpu")), torch.ones(3, 3, dtype=torch.bool).tril())


@pytest.mark.parametrize("nq,nk", [(5, 5), (3, 8), (1, 6)])
def test_causal_is_the_bottom_right_mask(nq, nk):
    q, k, v = _qkv(2, nq, nk)
    got = attend(q, k, v, causal=True, flash=True)  # the CPU has no flash kernel: the mask is spelled out
    torch.testing.assert_close(got, attend(q, k, v, bottom_right_causal(nq, nk, q.device)), rtol=0, atol=0)
    torch.testing.assert_close(got.double(), _exact(q, k, v, bottom_right_causal(nq, nk, q.device)), rtol=1e-5, atol=1e-5)


def test_a_mask_and_causal_together_are_refused():
    q, k, v = _qkv(1, 2, 2)
    with pytest.raises(ValueError, match="not both"):
        attend(q, k, v, torch.ones(2, 2, dtype=torch.bool), causal=True)


@pytest.mark.parametrize("nq,nk,causal", [(50, 50, True), (30, 1120, True), (1026, 1070, False)])
def test_on_a_gpu_flash_calls_run_the_flash_kernel_with_the_masked_calls_result(nq, nk, causal):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    q, k, v = _qkv(2, nq, nk, heads=28, kv=4, d=128, dtype=torch.bfloat16, device="cuda")
    mask = bottom_right_causal(nq, nk, q.device) if causal else None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        got = attend(q, k, v, causal=causal, flash=True)
        torch.cuda.synchronize()
    kernels = [e.name.lower() for e in prof.events()]
    assert any("flash" in name for name in kernels) and not any("cudnn" in name for name in kernels), kernels
    masked = attend(q, k, v, mask)  # the default kernel with the mask spelled out
    exact = _exact(q, k, v, mask)
    err, masked_err = (got.double() - exact).abs(), (masked.double() - exact).abs()
    assert err.max() <= 2 * masked_err.max() + 1e-3 and err.mean() <= 2 * masked_err.mean() + 1e-4
