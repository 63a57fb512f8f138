"""A rank's share of a handoff: how a worker rank of a parallel DiT replica gets the KV
contexts of its own branches from the handoff's transport itself, not through rank 0.

`fetch_share` is the one place a rank does this. It gets the handoff's payload (small: refs
or handles, never the tensors), what the rank wants of it (`ParallelDiT.wants`: branch -> KV
head group) and the rank's own transport, and returns those contexts, or None where the
payload cannot reach this process; the rank then gets them from rank 0 over the process
group, as before:

| payload                                    | this rank                                          |
|--------------------------------------------|----------------------------------------------------|
| `StoredContexts` (object store, by reference) | gets only the pieces its branches cover (any node) |
| `DirectPayload`, the sender's GPU visible here (CUDA IPC) | maps the sender's memory and copies out its pieces |
| `DirectPayload`, both on GPUs with NCCL (any node) | asks the sender for its pieces over a NCCL pair of its own (`Receiver.share`) |
| anything else: the pull-through-fetch fallback, `PackedContexts` (one buffer, already in rank 0's process), a rank on the CPU | None: rank 0 relays |

Rank 0 receives the whole handoff first and has the sender keep it (`Receiver.hold`), so the
worker ranks' pieces are still there when they ask; rank 0 releases it once every rank holds
its share (`KVTransport.release`).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from bagel_ray.engine.kv_context import KVContext
from bagel_ray.transport import ray_store
from bagel_ray.transport.base import KVTransport, TransferStats
from bagel_ray.transport.direct import DirectTransport
from bagel_ray.transport.object_store import StoredContexts, stored_share
from bagel_ray.transport.routes import DirectPayload


def portable(payload: Any) -> bool:
    """Whether a worker rank may get its share from `payload` itself (it is refs or handles,
    small to ship with the rank's call); a payload that holds the tensors stays with rank 0."""
    return isinstance(payload, (StoredContexts, DirectPayload))


def fetch_share(payload: Any, wants: dict[str, tuple[int, int]], device: torch.device, dtype: torch.dtype,
                transport: KVTransport | None = None,
                timeout_s: float = ray_store.GET_TIMEOUT_S) -> tuple[dict[str, KVContext], TransferStats] | None:
    """This rank's contexts of `payload` (branch -> (KV head group, of how many groups)), on
    `device` in `dtype`, with the bytes this rank got and the route; None when this process
    cannot get them from the payload (the module docstring's table). `transport`: this rank's
    own, of the replica's kind (a GPU-direct payload is pulled through its receiver). Pieces
    that do not come within `timeout_s` raise `HandoffGone`; a GPU route raises what it
    raises."""
    t0 = time.perf_counter()
    if isinstance(payload, StoredContexts):
        contexts, nbytes = stored_share(payload, wants, device, dtype, timeout_s)
        return contexts, TransferStats(nbytes, payload.send_s, time.perf_counter() - t0, "object_store")
    if isinstance(payload, DirectPayload) and isinstance(transport, DirectTransport):
        return transport.receiver.share(payload, wants, device, dtype)
    return None
