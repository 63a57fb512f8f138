"""GPU-direct KV handoff: the sender keeps its contexts on its GPU, the receiver pulls them.

`send` puts the context tensors (one per context, every layer in it, as the engines make
them: no packing copy) in the sender's outbox and returns a small payload: the layout, a
handoff id, where the sender is (node, GPU UUID, whether it has NCCL), the address of its
control channel (`control.py`: how a receiver asks for a transfer and releases a handoff),
its Ray actor handle (for the object-store fallback), and CUDA IPC handles of the tensors. `receive` picks a route from the payload and its own
place (`routes.plan_route`, the whole decision table):

| route      | when                                                   | how                               |
|------------|--------------------------------------------------------|-----------------------------------|
| `local`    | the sender is this process                             | the tensors themselves            |
| `cuda_ipc` | same node and the sender's GPU is visible here (UUID)  | map the sender's memory, one D2D copy |
| `nccl`     | both on GPUs with NCCL, not the same GPU (any node)    | a two-rank communicator per pair  |
| `fetch`    | anything else, or a GPU route that failed              | the sender packs to host, Ray object store |

`cuda_ipc` and `nccl` allow only their own GPU route, `auto` both (IPC first: it is a copy on
the same card); each falls back to `fetch`, with a warning that says why. Ray gives each
replica its own CUDA_VISIBLE_DEVICES, so in a cluster `cuda_ipc` is the route of replicas
that share a GPU and `nccl` that of replicas on different GPUs, on one node or several.

NCCL communicators are made lazily, one per (sender replica, receiver replica) pair, with a
unique id the receiver makes and passes in its first "send" request; both sides wait with
deadlines, and a failure or a timeout aborts the pair's communicator (the next handoff makes
a new one) and sends this handoff through the object store. Pairs unused for `link_idle_s`
are aborted; so is everything when the transport closes or is collected with its replica.
A handoff the sender no longer has (too old, evicted, sender gone) raises `HandoffGone`,
which the driver retries like a replica that died: nothing here waits without a deadline.

A DiT replica of several ranks (`ranks` > 1) receives one handoff in every rank: rank 0
receives it whole and asks the sender to keep it (`Receiver.hold`), each worker rank, with a
transport of its own, takes only its pieces (`Receiver.share`: mapped over CUDA IPC, or sent
over the worker's own NCCL pair, the sender copying each piece out contiguous), and rank 0
releases the handoff once every rank holds its share.

A NCCL handoff starts when both sides have posted, and on an idle pair the posts, not the
link, were the slow part: a thread that has just woken ran its allocation and NCCL call at
a third to half its warm speed. Two things take work off that path. The sender's control
channel polls for the request for `request_spin_s` after each send instead of sleeping
(`ControlServer.expect`); the receiver, while a transfer runs, makes the buffer of the next
one (`spare_buffers`; one spare per receiver, the size of its last context, used when the
next one fits it and it is at most a quarter bigger: that much more memory on the receiver's
GPU, and none when there is no room for it). In same-host comparisons on 2x H200 they took a
500 MB handoff from 2.00-2.17 to 1.90-2.11 ms (benchmarks/RESULTS.md, "KV handoff").

Host contexts (a CPU Thinker) are pushed through the object store at once, as
`object_store` does; `pull_host_contexts` keeps them in the outbox instead (the pull path of
GPU contexts with no direct route, exercised on CPU by the tests).

The parts, one module each: `routes` (where each side is, the payload, the decision table),
`sender` (the outbox and what a receiver's requests run at the sender), `receiver` (each route's
pull and the fallback), `links` (a side's NCCL communicators, one per pair) and `ray_peer` (the
Ray side: node and actor of this process, the object-store fetch). `DirectTransport` composes a
sender and a receiver that share one key, one NCCL library and this process's placement.
"""

from __future__ import annotations

import logging
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from bagel_ray.engine.kv_context import ImageContexts
from bagel_ray.transport import cuda, ray_peer
from bagel_ray.transport.base import KVTransport, TransferStats
from bagel_ray.transport.links import abort_all
from bagel_ray.transport.nccl import CommFactory, NcclComms
from bagel_ray.transport.object_store import PackedContexts
from bagel_ray.transport.receiver import Receiver
from bagel_ray.transport.routes import GPU_ROUTES, DirectPayload, Placement
from bagel_ray.transport.sender import Sender

log = logging.getLogger(__name__)


class _Places:
    """This process's placement for each device (fixed for the life of the process)."""

    def __init__(self, comms: CommFactory) -> None:
        self._comms = comms
        self._places: dict[torch.device, Placement] = {}

    def __call__(self, device: torch.device) -> Placement:
        if device not in self._places:
            gpu = cuda.gpu_uuid(device) if device.type == "cuda" else None
            self._places[device] = Placement(ray_peer.node_id(), gpu, cuda.visible_gpus(),
                                             gpu is not None and self._comms.available)
        return self._places[device]


@dataclass(frozen=True)
class DirectSettings:
    """The knobs of a GPU-direct transport, read by its sender and its receiver.

    `outbox_bytes`, `outbox_ttl_s`: what the sender keeps for receivers to pull. Deadlines:
    `connect_timeout_s` (added to a pair's first handoff: NCCL init), `transfer_timeout_s`
    (each NCCL handoff), `reply_timeout_s` (the sender's answer to "send me this", which a
    live sender gives at once: Ray may take a minute to call a dead replica dead),
    `fetch_timeout_s` (the object-store fallback). `link_idle_s`: a pair's communicator
    unused this long is aborted (both sides). `request_spin_s`: after a send, how long the
    sender's control channel polls for the receiver's request rather than sleep (0: never).
    `spare_buffers`: a receiver makes the next handoff's receive buffer while a transfer runs.
    `pull_host_contexts`: host contexts stay in the outbox to be pulled, as GPU contexts do,
    instead of going through the object store at once (tests).
    """

    outbox_bytes: int = 8 << 30
    outbox_ttl_s: float = 600.0
    connect_timeout_s: float = 30.0
    transfer_timeout_s: float = 10.0
    reply_timeout_s: float = 5.0
    fetch_timeout_s: float = 120.0
    link_idle_s: float = 900.0
    request_spin_s: float = 0.02
    spare_buffers: bool = True
    pull_host_contexts: bool = False


class DirectTransport(KVTransport):
    """See the module docstring. Subclasses choose the GPU routes (`routes`)."""

    name = "direct"
    routes: ClassVar[frozenset[str]] = frozenset(GPU_ROUTES)
    crosses_processes = True

    def __init__(self, settings: DirectSettings = DirectSettings(), *, ranks: int = 1,
                 comms: CommFactory | None = None, placement: Callable[[torch.device], Placement] | None = None) -> None:
        """`settings`: shared by the sender and the receiver (`DirectSettings`). `ranks`: of the
        receiving DiT replica; above 1, host contexts go by reference in pieces
        (`object_store.StoredContexts`) and a handoff received over CUDA IPC is released by
        `release`, once every rank has mapped it. `comms` and `placement` replace NCCL and this
        process's own placement (tests)."""
        self.key = uuid.uuid4().hex
        comms = comms if comms is not None else NcclComms()
        placement = placement if placement is not None else _Places(comms)
        self.sender = Sender(self.key, comms, placement, ray_peer.node_address, ray_peer.current_actor, settings,
                             ipc="cuda_ipc" in self.routes, ranks=ranks)
        self.receiver = Receiver(self.key, self.routes, comms, placement, ray_peer.fetch, settings, hold=ranks > 1)
        # Communicators die with the transport; at interpreter exit the process takes them.
        weakref.finalize(self, abort_all, self.receiver.links, self.sender.links).atexit = False

    def send(self, contexts: ImageContexts) -> DirectPayload | PackedContexts:
        return self.sender.send(contexts)

    def receive(self, payload: Any, device: torch.device) -> tuple[ImageContexts, TransferStats]:
        return self.receiver.receive(payload, device)

    def release(self, payload: Any) -> None:
        """Every rank of this (several-rank) DiT replica holds its share of `payload`: a handoff
        mapped over CUDA IPC is let go at the sender."""
        if isinstance(payload, DirectPayload):
            self.receiver.release(payload)

    def close(self) -> None:
        self.sender.close()
        self.receiver.close()


class AutoTransport(DirectTransport):
    """The fastest route that works for each pair: CUDA IPC, else NCCL, else the object store."""

    name = "auto"
    routes = frozenset(GPU_ROUTES)


class CudaIpcTransport(DirectTransport):
    name = "cuda_ipc"
    routes = frozenset({"cuda_ipc"})
    needs_cuda = True


class NcclTransport(DirectTransport):
    name = "nccl"
    routes = frozenset({"nccl"})
    needs_cuda = True
