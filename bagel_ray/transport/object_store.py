"""Handoff through the Ray object store, by value (one contiguous buffer) or by reference (in
pieces, for a DiT replica of several ranks).

By value (`PackedContexts`, a one-rank receiver): the sender copies every KV tensor of the
contexts into one host buffer (pinned when the tensors are on a GPU, so the device-to-host
copy runs at full speed and pageable memory is never touched) and returns it as a numpy array,
which Ray stores out of band as part of the payload. The receiver gets a zero-copy numpy view
of the object-store memory and makes one host-to-device copy.

By reference (`StoredContexts`, when the receiving replica has `ranks` > 1): each context
tensor is cut along its rows at the cut points of the prefix CFG branches and along its KV
heads into `ranks` groups (where they divide), and each piece is put in the object store
itself (`ray_store.put`); the payload carries the object refs. Every rank of the DiT replica
then gets the pieces its own branches cover (`stored_share`: cfg_text's rank only the prefix,
a rank that helps cond only its heads of it), not the whole handoff through rank 0. Ray is
reached only through `ray_store`.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bagel_ray.engine.kv_context import ImageContexts, KVContext
from bagel_ray.transport import ray_store
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


def _readable(array: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():
        # The object store hands out read-only memory; the KV is only ever read.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def unpacked(payload: PackedContexts, device: torch.device) -> ImageContexts:
    layout = payload.layout
    flat = _readable(payload.buffer)
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


@dataclass(frozen=True)
class StoredContexts:
    """Contexts in the object store by reference, in pieces (the module docstring). Piece
    (tensor t, row range i, head group g) is `refs[t][i * head_groups + g]`; `rows[t]` holds
    tensor t's row bounds (0, ..., T)."""

    layout: ContextsLayout
    rows: tuple[tuple[int, ...], ...]
    head_groups: int
    refs: tuple[tuple[Any, ...], ...]
    send_s: float

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    def pieces(self, tensor: int, length: int, heads: tuple[int, int]) -> list[tuple[Any, tuple[int, int], tuple[int, int]]]:
        """(ref, its rows, its heads) of each piece of context tensor `tensor` that its first
        `length` rows of KV heads [lo, hi) overlap."""
        bounds, kv_heads = self.rows[tensor], self.layout.shapes[tensor][3]
        per = kv_heads // self.head_groups
        out = []
        for i, (r0, r1) in enumerate(zip(bounds, bounds[1:])):
            for g in range(self.head_groups):
                h0, h1 = g * per, (g + 1) * per
                if r0 < length and h0 < heads[1] and heads[0] < h1:
                    out.append((self.refs[tensor][i * self.head_groups + g], (r0, r1), (h0, h1)))
        return out


def stored(contexts: ImageContexts, ranks: int) -> StoredContexts:
    """`contexts` put in the object store in pieces for a receiver of `ranks` ranks."""
    t0 = time.perf_counter()
    layout = ContextsLayout.of(contexts)
    kv_heads = layout.shapes[0][3]
    groups = ranks if kv_heads % ranks == 0 else 1
    cuts = [c.length for c in (contexts.cfg_text, contexts.cfg_img) if not isinstance(c, KVContext)]
    rows, refs = [], []
    for index, t in enumerate(ContextsLayout.tensors(contexts)):
        length, per = t.shape[2], kv_heads // groups
        inner = {c for c in cuts if 0 < c < length} if index == 0 else set()  # the cuts are of gen
        bounds = tuple(sorted({0, length} | inner))
        pieces = [t[:, :, r0:r1, g * per : (g + 1) * per] for r0, r1 in zip(bounds, bounds[1:]) for g in range(groups)]
        rows.append(bounds)
        refs.append(tuple(ray_store.put(pack([p])) for p in pieces))
    return StoredContexts(layout, tuple(rows), groups, tuple(refs), time.perf_counter() - t0)


def _regions(payload: StoredContexts, regions: list[tuple[int, int, tuple[int, int]]], device: torch.device,
             dtype: torch.dtype | None = None, timeout_s: float = ray_store.GET_TIMEOUT_S) -> tuple[list[torch.Tensor], int]:
    """Each region (context tensor, first rows, KV heads [lo, hi)) of a stored handoff as a
    tensor on `device` (in `dtype`, default the handoff's), getting each piece it covers once
    (`HandoffGone` past `timeout_s`); and the bytes got."""
    layout = payload.layout
    wanted = [payload.pieces(*region) for region in regions]
    refs = list({id(ref): ref for pieces in wanted for ref, _, _ in pieces}.values())
    arrays = dict(zip(map(id, refs), ray_store.get(refs, timeout_s)))
    out = []
    for (tensor, length, (lo, hi)), pieces in zip(regions, wanted):
        shape = layout.shapes[tensor]
        target = torch.empty((*shape[:2], length, hi - lo, *shape[4:]), dtype=dtype or layout.torch_dtype, device=device)
        for ref, (r0, r1), (h0, h1) in pieces:
            piece = _readable(arrays[id(ref)]).view(layout.torch_dtype).view(*shape[:2], r1 - r0, h1 - h0, *shape[4:])
            a, b, c, d = r0, min(r1, length), max(h0, lo), min(h1, hi)
            target[:, :, a:b, c - lo : d - lo].copy_(piece[:, :, : b - a, c - h0 : d - h0])
        out.append(target)
    return out, sum(a.nbytes for a in arrays.values())


def unstored(payload: StoredContexts, device: torch.device) -> ImageContexts:
    """The whole contexts of a stored handoff."""
    layout = payload.layout
    tensors, _ = _regions(payload, [(t, shape[2], (0, shape[3])) for t, shape in enumerate(layout.shapes)], device)
    return layout.assemble(tensors)


def stored_share(payload: StoredContexts, wants: dict[str, tuple[int, int]], device: torch.device,
                 dtype: torch.dtype, timeout_s: float = ray_store.GET_TIMEOUT_S) -> tuple[dict[str, KVContext], int]:
    """The contexts one rank wants of a stored handoff (branch -> (KV head group, of how many
    groups), as `ParallelDiT.wants` says), getting only the pieces they cover; and the bytes
    got."""
    layout, regions, ropes = payload.layout, [], []
    for branch, (index, parts) in wants.items():
        tensor, length, rope = layout.region(branch)
        per = layout.shapes[tensor][3] // parts
        regions.append((tensor, length, (index * per, (index + 1) * per)))
        ropes.append(rope)
    tensors, nbytes = _regions(payload, regions, device, dtype, timeout_s)
    return {b: KVContext(kv, rope) for b, kv, rope in zip(wants, tensors, ropes)}, nbytes


def received(payload: PackedContexts | StoredContexts, device: torch.device) -> tuple[ImageContexts, int]:
    """The whole contexts of an object-store handoff, either kind; and its bytes."""
    if isinstance(payload, StoredContexts):
        return unstored(payload, device), payload.nbytes
    return unpacked(payload, device), payload.buffer.nbytes


class ObjectStoreTransport(KVTransport):
    name = "object_store"
    crosses_processes = True

    def __init__(self, ranks: int = 1) -> None:
        """`ranks`: how many ranks the receiving DiT replica has; above 1 the contexts go by
        reference, in pieces (`StoredContexts`)."""
        self.ranks = ranks

    def send(self, contexts: ImageContexts) -> PackedContexts | StoredContexts:
        return stored(contexts, self.ranks) if self.ranks > 1 else packed(contexts)

    def receive(self, payload: PackedContexts | StoredContexts, device: torch.device) -> tuple[ImageContexts, TransferStats]:
        t0 = time.perf_counter()
        contexts, nbytes = received(payload, torch.device(device))
        return contexts, TransferStats(nbytes, payload.send_s, time.perf_counter() - t0, self.name)
