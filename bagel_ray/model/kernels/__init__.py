"""Fused kernels of the model, one module per kernel family, each with its eager reference
(the official code's rounding order, spec 11.2-11.4), its Triton kernel and its dispatch:

- `norm`: `rms_norm`, `add_rms_norm` (the residual add and the norm in one pass)
- `rope`: `qk_norm_rope` (the QK-norm and rotate-half RoPE of q and k heads), `QKNormRope`
- `decode_attention`: a decoding step's attention over a preallocated cache
- `silu_mul`: SiLU(gate) * up
- `gemv`: `linear`, `silu_mul_linear` (one row on the GPU: a GEMV)
- `group_norm`: the VAE's GroupNorm and swish

On a CUDA device with Triton the kernels run (one read and one write of each tensor instead
of the half-dozen passes of the eager PyTorch ops); elsewhere the references run. This module
holds what every family's dispatch shares: whether Triton is there, the `eager()` switch that
runs the references (the benchmarks' correctness guard), and `fall_back`, which logs the first
time a family runs its reference on a GPU for a given reason.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import torch

try:  # pragma: no cover - exercised on GPU machines
    import triton
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

log = logging.getLogger(__name__)

_EAGER = [False]
_FELL_BACK: set[tuple[str, str]] = set()


@contextmanager
def eager() -> Iterator[None]:
    """Run the eager references inside this block (the benchmarks' correctness guard)."""
    _EAGER.append(True)
    try:
        yield
    finally:
        _EAGER.pop()


def in_eager() -> bool:
    """Whether an `eager()` block is active (what is captured in CUDA graphs stays outside)."""
    return _EAGER[-1]


def unsupported(x: torch.Tensor) -> str | None:
    """Why x's op cannot run as a Triton kernel (None: it can): it runs on a CUDA device with
    Triton, outside `eager()`, in bf16, fp16 or fp32."""
    if triton is None:
        return "Triton is not installed"
    if _EAGER[-1]:
        return "inside eager()"
    if not x.is_cuda:
        return "not on a GPU"
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"no kernel for {x.dtype}"
    return None


def fall_back(family: str, x: torch.Tensor, why: str | None) -> bool:
    """Note that `family` runs its eager reference for `x`: logged the first time for each
    reason when x is on a GPU outside `eager()` (on the CPU the reference is the path).
    Returns whether there is a reason (`why` not None): the dispatch's test."""
    if why is None:
        return False
    if x.is_cuda and not _EAGER[-1] and (family, why) not in _FELL_BACK:
        _FELL_BACK.add((family, why))
        log.info("kernels: %s runs its eager reference on the GPU (%s)", family, why)
    return True
