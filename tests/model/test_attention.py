"""`attention.attend`: the bottom-right causal mask, and on a GPU the flash kernel for
`flash=True` calls (no per-length plan), with the masked call's results; a thread that defers
plans runs unplanned shapes on flash until `build_plan` has built them."""

from __future__ import annotations

import threading

import pytest
import torch

from bagel_ray.model import attention
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


def _in_a_thread(fn):
    """fn's result in a fresh thread (plans are per thread, as PyTorch keeps cuDNN's)."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # re-raised in the test's thread
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def _dit_branch(nq: int, nk: int, device: str = "cpu", dtype=torch.float32):
    """q as the DiT has it (a strided view of the normed q/k heads) over a branch's K/V."""
    g = torch.Generator(device=device).manual_seed(nk)
    qk = torch.randn(1, nq, 28 + 4, 128, generator=g, device=device).to(dtype)
    kv = torch.randn(2, 1, nk, 4, 128, generator=g, device=device).to(dtype)
    return qk[:, :, :28].transpose(1, 2), kv[0].transpose(1, 2), kv[1].transpose(1, 2)


def test_a_deferring_thread_keeps_unplanned_shapes_until_build_plan(monkeypatch):
    """The bookkeeping, on the CPU (which has a flash kernel of its own) with flash made to fit."""
    monkeypatch.setattr(attention, "_flash_fits", lambda q, k, v, causal: True)
    a, b = _dit_branch(8, 20), _dit_branch(8, 24)

    def deferring():
        attention.defer_plans()
        seen = []
        for call in (a, a, b, a):
            attend(*call)
            seen.append(attention.plans_pending())
        built = [attention.build_plan() for _ in range(3)]
        attend(*a)
        attend(*b)
        return seen, built, attention.plans_pending()

    assert _in_a_thread(deferring) == ([1, 1, 2, 2], [True, True, False], 0)
    # other threads, this one included, do not defer
    attend(*a)
    assert attention.plans_pending() == 0 and _in_a_thread(lambda: (attend(*b), attention.plans_pending())[1]) == 0
    # masked and causal calls are never deferred: flash cannot take the mask
    def masked():
        attention.defer_plans()
        q, k, v = a
        attend(q, k, v, torch.ones(8, 20, dtype=torch.bool))
        attend(q, k, v, causal=True)
        return attention.plans_pending()

    assert _in_a_thread(masked) == 0


def test_on_a_gpu_a_deferred_shape_runs_flash_then_the_default_kernel_once_planned():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from torch.profiler import ProfilerActivity, profile

    call = _dit_branch(1026, 1070, "cuda", torch.bfloat16)

    def kernels(fn):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            out = fn()
            torch.cuda.synchronize()
        return out, [e.name.lower() for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]

    def deferring():
        attention.defer_plans()
        before, names_before = kernels(lambda: attend(*call))
        waiting = attention.plans_pending()
        built = attention.build_plan()
        after, names_after = kernels(lambda: attend(*call))
        return before, names_before, waiting, built, after, names_after, attention.plans_pending()

    before, names_before, waiting, built, after, names_after, left = _in_a_thread(deferring)
    assert waiting == 1 and built and left == 0
    assert any("flash" in n for n in names_before) and not any("cudnn" in n for n in names_before), names_before
    _, names_default = kernels(lambda: attend(*call))  # this thread does not defer: the default kernel (cuDNN on an H100)
    assert any("cudnn" in n for n in names_after) == any("cudnn" in n for n in names_default), (names_after, names_default)
    forced = attend(*call, flash=True)
    assert torch.equal(before, forced)  # the deferred call is the flash call, bit for bit
    assert torch.equal(after, attend(*call))  # the planned call is the default call
    exact = _exact(*call, None)
    assert (before.double() - exact).abs().max() <= 2 * (after.double() - exact).abs().max() + 1e-3
