"""Handoff through the Ray object store as one contiguous buffer.

The sender copies every KV tensor of the contexts into one host buffer (pinned when the
tensors are on a GPU, so the device-to-host copy runs at full speed and pageable memory is
never touched) and returns it as a numpy array, which Ray stores out of band. The receiver
gets a zero-copy numpy view of the object-store memory and makes one host-to-device copy.
Nothing here imports Ray: the payload is plain picklable data that Ray moves.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from bagel_ray.engine.kv_context import ImageContexts
from bagel_ray.transport.base import KVTransport, TransferStats
from bagel_ray.transport.layout import ContextsLayout


@dataclass(frozen=True)
class PackedContexts:
    buffer: np.ndarray  # uint8, every context tensor back to back, in layout order
    layout: ContextsLayout
    send_s: float


def _side_stream(device: torch.device):
    """A stream of its own for a copy to or from `device` (none off the GPU), so the copy
    neither waits behind nor holds up the engine's work on the default stream."""
    return torch.cuda.Stream(device) if device.type == "cuda" else None


def pack(tensors: list[torch.Tensor]) -> np.ndarray:
    total = sum(t.numel() * t.element_size() for t in tensors)
    stream = _side_stream(tensors[0].device)
    staging = torch.empty(total, dtype=torch.uint8, pin_memory=stream is not None)
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream(tensors[0].device))  # the tensors are written
    offset = 0
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        for t in tensors:
            n = t.numel() * t.element_size()
            staging[offset : offset + n].copy_(t.contiguous().view(torch.uint8).flatten(), non_blocking=stream is not None)
            offset += n
    if stream is not None:
        stream.synchronize()
    return staging.numpy()


def packed(contexts: ImageContexts) -> PackedContexts:
    t0 = time.perf_counter()
    layout = ContextsLayout.of(contexts)
    buffer = pack(ContextsLayout.tensors(contexts))
    return PackedContexts(buffer, layout, time.perf_counter() - t0)


def unpacked(payload: PackedContexts, device: torch.device) -> ImageContexts:
    layout = payload.layout
    with warnings.catch_warnings():
        # The object store hands out read-only memory; the KV is only ever read.
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.from_numpy(payload.buffer)
    stream = _side_stream(device)
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        flat = flat.to(device, non_blocking=True)
    if stream is not None:
        stream.synchronize()
        flat.record_stream(torch.cuda.default_stream(device))  # the engines read it there
    tensors, offset = [], 0
    for shape, n in zip(layout.shapes, layout.sizes):
        tensors.append(flat[offset : offset + n].view(layout.torch_dtype).view(shape))
        offset += n
    return layout.assemble(tensors)


class ObjectStoreTransport(KVTransport):
    name = "object_store"
    crosses_processes = True

    def send(self, contexts: ImageContexts) -> PackedContexts:
        return packed(contexts)

    def receive(self, payload: PackedContexts, device: torch.device) -> tuple[ImageContexts, TransferStats]:
        t0 = time.perf_counter()
        contexts = unpacked(payload, torch.device(device))
        return contexts, TransferStats(payload.buffer.nbytes, payload.send_s, time.perf_counter() - t0, self.name)
