"""Capturing a piece of GPU work as a CUDA graph: the one recipe the decode steps and the prompt
prefills share (the DiT's layer graphs capture many segments back to back and use the raw
`capture_begin` / `capture_end` instead, see `dit_graphs`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def capture(run: Callable[[], T], device: torch.device, pool=None,
            after_warm_up: Callable[[], None] | None = None) -> tuple[torch.cuda.CUDAGraph, T]:
    """Capture `run` (which must read and write only tensors that outlive the graph) and return
    the graph with what the captured `run` returned (its outputs, overwritten by each replay).

    `run` first runs once eagerly on a side stream, so that cuBLAS, cuDNN and Triton pick and
    load their kernels outside the capture; `after_warm_up` then undoes what that run changed
    (state it advanced). `pool` shares one memory pool between graphs that never replay at once.
    The capture is thread-local: CUDA calls of other threads (a transport sending) may not break it."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream(device).wait_stream(side)
    if after_warm_up is not None:
        after_warm_up()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = run()
    return graph, out
