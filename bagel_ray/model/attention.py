"""Scaled dot-product attention, and which kernel runs it.

PyTorch's SDPA picks cuDNN on an H100 for these shapes. cuDNN builds an execution plan for
each new (batch, query length, key length) and keeps it per thread: 55-100 ms a new shape on
an H100, and 0.7-1.9 s when the shape needs a kernel variant not compiled yet (RESULTS.md,
"Attention plans"; `benchmarks/bench_attention_plans.py`). Context prefills change length
with every prompt and image, so cuDNN's plan cost came on top of nearly every request, and a
32-stream chat burst that met new batch shapes stalled for seconds. The flash kernel needs no
plan (a new length costs ~0.1 ms) and at prefill shapes it is also faster (27-50 us against
62-89 us for cuDNN with the mask). Callers whose lengths vary (`flash=True`) get it. The DiT's
denoising attention keeps the default (cuDNN): faster at its shapes (40 against 59 us at 512²,
404 against 692 us at 1024²), and a request repeats its lengths over all its steps.

Where flash cannot run (the CPU, fp32, a padding mask), the call is the plain SDPA with the
mask spelled out, as the official code computes it.

A DiT replica still met a new length with every prompt length it had not seen: its first
request at that length paid the plan (80-90 ms at 512²). A thread that calls `defer_plans`
runs such a call on flash instead and keeps its shape; `build_plan`, called when the thread
has nothing else to do, builds the default kernel's plan for one kept shape, and from then on
that shape runs on the default kernel. The two kernels' results differ by bf16 rounding (as
batched and unbatched requests already do), so a request's latents can depend, at that level,
on which lengths its replica had planned.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right


def bottom_right_causal(num_q: int, num_k: int, device: torch.device) -> torch.Tensor:
    """[num_q, num_k] boolean mask: query i sees keys up to num_k - num_q + i (a block appended
    to a context sees all of the context and itself causally; flash-attn's alignment)."""
    return torch.ones(num_q, num_k, dtype=torch.bool, device=device).tril(num_k - num_q)


def _flash_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> bool:
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, causal and q.shape[-2] == k.shape[-2],
                                            q.shape[1] != k.shape[1])
    return torch.backends.cuda.can_use_flash_attention(params)


class _Plans(threading.local):
    """Per thread, as PyTorch keeps the cuDNN plans: whether this thread defers them, the
    layouts (q, k, v) it has planned, and those waiting for `build_plan`."""

    def __init__(self) -> None:
        self.deferring = False
        self.built: set[tuple] = set()
        self.pending: set[tuple] = set()


_plans = _Plans()


def defer_plans() -> None:
    """From now on this thread runs default-kernel calls of an unplanned shape on flash, and
    builds their plans in `build_plan` (a serving thread, when it is idle)."""
    _plans.deferring = True


def plans_pending() -> int:
    """How many shapes this thread has run on flash while waiting for their plans."""
    return len(_plans.pending)


def _layout(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.stride(), t.dtype, t.device


def build_plan() -> bool:
    """Build the default kernel's plan for one shape waiting for it (one call on uninitialised
    tensors of the same layout: the plan depends on shapes and strides, not values); False when
    none waits."""
    if not _plans.pending:
        return False
    layouts = _plans.pending.pop()
    q, k, v = (torch.empty_strided(shape, stride, dtype=dtype, device=device) for shape, stride, dtype, device in layouts)
    with torch.no_grad():
        F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1])
    _plans.built.add(layouts)
    return True


def _deferred(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether this default-kernel call runs on flash because its plan is not built yet."""
    if not _plans.deferring:
        return False
    layouts = (_layout(q), _layout(k), _layout(v))
    if layouts in _plans.pending:
        return True
    if layouts in _plans.built or not _flash_fits(q, k, v, False):
        return False
    _plans.pending.add(layouts)
    return True


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           causal: bool = False, flash: bool = False) -> torch.Tensor:
    """q [B, H, Lq, d] over k, v [B, kv, Lk, d] (grouped-query when kv < H). `causal`: the
    bottom-right causal mask (`bottom_right_causal`); `mask` (boolean, broadcastable to [B, H,
    Lq, Lk]) instead, for padded batches: not both. `flash`: lengths vary from call to call, so
    take the flash kernel where it applies (no mask, half precision on a GPU)."""
    if mask is not None and causal:
        raise ValueError("give a mask or causal=True, not both")
    gqa = q.shape[1] != k.shape[1]
    num_q, num_k = q.shape[-2], k.shape[-2]
    if mask is None and ((flash and _flash_fits(q, k, v, causal)) or (not flash and not causal and _deferred(q, k, v))):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            if causal and num_q != num_k:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(num_q, num_k), enable_gqa=gqa)
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    if causal and num_q > 1:
        mask = bottom_right_causal(num_q, num_k, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
