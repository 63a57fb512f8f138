"""A rank's share of a handoff: how a worker rank of a parallel DiT replica gets the KV
contexts of its own branches from the handoff's transport itself, not through rank 0.

`fetch_share` is the one place a rank does this. It gets the handoff's payload (small: refs
or handles, never the tensors) and what the rank wants of it (`ParallelDiT.wants`: branch ->
KV head group), and returns those contexts, or None where the payload cannot reach this
process; the rank then gets them from rank 0 over the process group, as before:

| payload                                    | this rank                                          |
|--------------------------------------------|----------------------------------------------------|
| `StoredContexts` (object store, by reference) | gets only the pieces its branches cover (any node) |
| `DirectPayload` with CUDA IPC handles, the sender's GPU visible here on its node | maps the sender's memory and copies its regions |
| anything else: NCCL (the Thinker sends to one receiver), the pull-through-fetch fallback, `PackedContexts` (one buffer, already in rank 0's process) | None: rank 0 relays |

So a NCCL handoff still reaches the other ranks through rank 0: the Thinker's pair
communicator is made with one receiver, and a send per rank is not built yet. A handoff
mapped over IPC is released by rank 0 once every rank holds its share (`KVTransport.release`).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from bagel_ray.engine.kv_context import KVContext
from bagel_ray.transport import cuda, ray_peer, ray_store
from bagel_ray.transport.base import TransferStats
from bagel_ray.transport.object_store import StoredContexts, stored_share
from bagel_ray.transport.routes import DirectPayload, Placement, plan_route


def portable(payload: Any) -> bool:
    """Whether a worker rank may get its share from `payload` itself (it is refs or handles,
    small to ship with the rank's call); a payload that holds the tensors stays with rank 0."""
    return isinstance(payload, (StoredContexts, DirectPayload))


def fetch_share(payload: Any, wants: dict[str, tuple[int, int]], device: torch.device, dtype: torch.dtype,
                timeout_s: float = ray_store.GET_TIMEOUT_S) -> tuple[dict[str, KVContext], TransferStats] | None:
    """This rank's contexts of `payload` (branch -> (KV head group, of how many groups)), on
    `device` in `dtype`, with the bytes this rank got and the route; None when this process
    cannot get them from the payload (the module docstring's table). Pieces that do not come
    within `timeout_s` raise `HandoffGone`."""
    t0 = time.perf_counter()
    if isinstance(payload, StoredContexts):
        contexts, nbytes = stored_share(payload, wants, device, dtype, timeout_s)
        return contexts, TransferStats(nbytes, payload.send_s, time.perf_counter() - t0, "object_store")
    if isinstance(payload, DirectPayload) and payload.ipc is not None and device.type == "cuda":
        device = cuda.resolve(device)
        here = Placement(ray_peer.node_id(), cuda.gpu_uuid(device), cuda.visible_gpus())
        if plan_route(frozenset({"cuda_ipc"}), payload.sender, here, local=False, has_ipc=True).name == "cuda_ipc":
            contexts, nbytes = _ipc_share(payload, wants, here, device, dtype)
            return contexts, TransferStats(nbytes, payload.send_s, time.perf_counter() - t0, "cuda_ipc")
    return None


def _ipc_share(payload: DirectPayload, wants: dict[str, tuple[int, int]], here: Placement, device: torch.device,
               dtype: torch.dtype) -> tuple[dict[str, KVContext], int]:
    """Map the sender's context tensors and copy out this rank's regions (one D2D copy each);
    nothing is released here (rank 0 does, once every rank holds its share)."""
    index = here.visible.index(payload.sender.gpu)
    layout, out, nbytes = payload.layout, {}, 0
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        mapped = [cuda.open_ipc(handle, index) for handle in payload.ipc]
        for branch, (group, parts) in wants.items():
            tensor, length, rope = layout.region(branch)
            per = layout.shapes[tensor][3] // parts
            region = mapped[tensor][:, :, :length, group * per : (group + 1) * per]
            kv = torch.empty(region.shape, dtype=dtype, device=device)
            kv.copy_(region, non_blocking=True)
            out[branch] = KVContext(kv, rope)
            nbytes += region.numel() * region.element_size()
    stream.synchronize()
    del mapped  # unmapped before rank 0 tells the sender it may let go
    for c in out.values():
        c.kv.record_stream(torch.cuda.default_stream(device))
    return out, nbytes
