"""The Ray side of the GPU-direct transport: where a sender is, and the object-store fallback.

A payload names its sender by the Ray actor handle of the replica that made it. When no GPU
route works, the receiver calls into exactly that replica (a Serve handle would route to any
replica) with the handle's `__ray_call__`, which runs `_fetch` in the replica's process: it
finds the sender there by key (`sender.local_sender`) and packs the contexts
into host memory for the object store. Requests for GPU transfers go over the control
channel instead (`control.py`), which is much faster than a call through Ray.
"""

from __future__ import annotations

import socket
from typing import Any

import ray
from ray.exceptions import GetTimeoutError

from bagel_ray.transport.object_store import PackedContexts
from bagel_ray.transport.sender import local_sender


def node_id() -> str:
    """The Ray node this process runs on (the host name outside Ray)."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else socket.gethostname()


def node_address() -> str:
    """The IP address other nodes reach this one at (loopback outside Ray)."""
    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


def current_actor() -> Any | None:
    """This replica's actor handle, or None outside an actor."""
    if not ray.is_initialized():
        return None
    try:
        return ray.get_runtime_context().current_actor
    except RuntimeError:  # a driver or a task, not an actor
        return None


# -- run in the sender's process (through __ray_call__) --------------------------------------


def _fetch(_actor: Any, key: str, handoff_id: str) -> PackedContexts | None:
    sender = local_sender(key)
    return None if sender is None else sender.serve_fetch(handoff_id)


def fetch(actor: Any, key: str, handoff_id: str, timeout_s: float) -> PackedContexts | None:
    """The handoff packed into host memory by the sender replica `actor`, through the object
    store; None when the sender no longer has it. Past `timeout_s`, `TimeoutError`."""
    try:
        return ray.get(actor.__ray_call__.remote(_fetch, key, handoff_id), timeout=timeout_s)
    except GetTimeoutError as exc:
        raise TimeoutError(str(exc)) from None
