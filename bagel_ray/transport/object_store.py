"""Handoff through the Ray object store as one contiguous buffer.

The sender copies every KV tensor of the contexts into one host buffer (pinned when the
tensors are on a GPU, so the device-to-host copy runs at full speed and pageable memory is
never touched) and returns it as a numpy array, which Ray stores out of band. The receiver
gets a zero-copy numpy view of the object-store memory and makes one host-to-device copy.
Nothing here imports Ray: the payload is plain picklable data that Ray moves.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from bagel_ray.engine.kv_context import Cut, ImageContexts, KVContext
from bagel_ray.transport.base import KVTransport, TransferStats

_DTYPES = {str(d): d for d in (torch.bfloat16, torch.float16, torch.float32)}


@dataclass(frozen=True)
class PackedContexts:
    buffer: np.ndarray  # uint8, every KV tensor back to back
    dtype: str
    gen_shape: tuple[int, ...]
    gen_rope: int
    cfg_text: Cut
    cfg_img: Cut | tuple[tuple[int, ...], int]  # a cut, or (shape, rope) of its own context
    height: int
    width: int
    send_s: float


def _pack(tensors: list[torch.Tensor]) -> np.ndarray:
    total = sum(t.numel() * t.element_size() for t in tensors)
    on_gpu = any(t.is_cuda for t in tensors)
    staging = torch.empty(total, dtype=torch.uint8, pin_memory=on_gpu)
    offset = 0
    for t in tensors:
        n = t.numel() * t.element_size()
        staging[offset : offset + n].copy_(t.contiguous().view(torch.uint8).flatten(), non_blocking=on_gpu)
        offset += n
    if on_gpu:
        torch.cuda.synchronize()
    return staging.numpy()


class ObjectStoreTransport(KVTransport):
    name = "object_store"
    crosses_processes = True
    crosses_nodes = True

    def send(self, contexts: ImageContexts) -> PackedContexts:
        t0 = time.perf_counter()
        tensors = [contexts.gen.kv]
        if isinstance(contexts.cfg_img, KVContext):
            tensors.append(contexts.cfg_img.kv)
            cfg_img = (tuple(contexts.cfg_img.kv.shape), contexts.cfg_img.rope)
        else:
            cfg_img = contexts.cfg_img
        buffer = _pack(tensors)
        return PackedContexts(buffer, str(contexts.gen.kv.dtype), tuple(contexts.gen.kv.shape), contexts.gen.rope,
                              contexts.cfg_text, cfg_img, contexts.height, contexts.width, time.perf_counter() - t0)

    def receive(self, payload: PackedContexts, device: torch.device) -> tuple[ImageContexts, TransferStats]:
        t0 = time.perf_counter()
        dtype = _DTYPES[payload.dtype]
        with warnings.catch_warnings():
            # The object store hands out read-only memory; the KV is only ever read.
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.from_numpy(payload.buffer)
        flat = flat.to(device, non_blocking=True)

        def take(offset: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, int]:
            n = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
            return flat[offset : offset + n].view(dtype).view(shape), offset + n

        gen_kv, offset = take(0, payload.gen_shape)
        gen = KVContext(gen_kv, payload.gen_rope)
        if isinstance(payload.cfg_img, Cut):
            cfg_img: Cut | KVContext = payload.cfg_img
        else:
            shape, rope = payload.cfg_img
            kv, offset = take(offset, shape)
            cfg_img = KVContext(kv, rope)
        if flat.is_cuda:
            torch.cuda.synchronize(flat.device)
        contexts = ImageContexts(gen, payload.cfg_text, cfg_img, payload.height, payload.width)
        return contexts, TransferStats(payload.buffer.nbytes, payload.send_s, time.perf_counter() - t0)
