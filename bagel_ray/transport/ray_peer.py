"""The Ray side of the GPU-direct transport: who a sender is, and how a receiver reaches it.

A payload names its sender by the Ray actor handle of the replica that made it. The receiver
calls into exactly that replica (a Serve handle would route to any replica) with the
handle's `__ray_call__`, which runs a function of ours in the replica's process; the
function finds the sender's transport in that process by key (`direct.local_sender`). The
calls return at once (a replica runs them on its request path): `start_send` queues the NCCL
send on the sender's own threads and answers whether it did, `release` drops a parcel, and
only `fetch`, the object-store fallback, does real work (packing the contexts to host memory).
"""

from __future__ import annotations

import socket
import time
from typing import Any

import ray

from bagel_ray.transport.object_store import PackedContexts


def node_id() -> str:
    """The Ray node this process runs on (the host name outside Ray)."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else socket.gethostname()


def current_actor() -> Any | None:
    """This replica's actor handle, or None outside an actor."""
    if not ray.is_initialized():
        return None
    try:
        return ray.get_runtime_context().current_actor
    except RuntimeError:  # a driver or a task, not an actor
        return None


# -- run in the sender's process (through __ray_call__) --------------------------------------


def _sender(key: str):
    from bagel_ray.transport.direct import local_sender

    return local_sender(key)


def _start_send(_actor: Any, key: str, handoff_id: str, receiver_key: str, comm_key: str,
                unique_id: bytes | None, timeout_s: float) -> str:
    sender = _sender(key)
    return "gone" if sender is None else sender.serve_send(handoff_id, receiver_key, comm_key, unique_id, timeout_s)


def _fetch(_actor: Any, key: str, handoff_id: str) -> PackedContexts | None:
    sender = _sender(key)
    return None if sender is None else sender.serve_fetch(handoff_id)


def _release(_actor: Any, key: str, handoff_id: str) -> None:
    sender = _sender(key)
    if sender is not None:
        sender.serve_release(handoff_id)


# -- the receiver's view of a remote sender ----------------------------------------------------


class Reply:
    """The sender's answer to `start_send`, awaited without blocking the transfer."""

    def __init__(self, ref: ray.ObjectRef) -> None:
        self._ref = ref
        self._status: str | None = None
        self._sent = time.monotonic()

    def age(self) -> float:
        """Seconds since the call went out."""
        return time.monotonic() - self._sent

    def status(self) -> str | None:
        """The answer, or None while it has not come. Raises what the call raised (the
        sender replica died: ActorDiedError)."""
        if self._status is None:
            ready, _ = ray.wait([self._ref], timeout=0)
            if ready:
                self._status = ray.get(self._ref)
        return self._status


class RayEndpoint:
    def __init__(self, actor: Any, key: str) -> None:
        self.actor = actor
        self.key = key

    def start_send(self, handoff_id: str, receiver_key: str, comm_key: str, unique_id: bytes | None,
                   timeout_s: float) -> Reply:
        return Reply(self.actor.__ray_call__.remote(_start_send, self.key, handoff_id, receiver_key, comm_key,
                                                    unique_id, timeout_s))

    def fetch(self, handoff_id: str, timeout_s: float) -> PackedContexts | None:
        return ray.get(self.actor.__ray_call__.remote(_fetch, self.key, handoff_id), timeout=timeout_s)

    def release(self, handoff_id: str) -> None:
        """Fire and forget: a parcel nobody releases leaves the outbox by age."""
        self.actor.__ray_call__.remote(_release, self.key, handoff_id)
