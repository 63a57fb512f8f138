"""One contract for moving image-generation contexts (`ImageContexts`) between stages.

A transport turns contexts into a picklable payload on the sending side (`send`) and back
into tensors on the receiving side (`receive`). It knows the KV layout, never the model.
Backends declare what they can do as class attributes; `make_transport` picks one by name
from a lazy registry and logs any fallback.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from bagel_ray.engine.kv_context import ImageContexts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TransferStats:
    """Bytes and seconds of one handoff (the sending and the receiving halves)."""

    nbytes: int
    send_s: float
    receive_s: float = 0.0


class KVTransport:
    name: ClassVar[str] = "base"
    crosses_processes: ClassVar[bool] = False
    crosses_nodes: ClassVar[bool] = False
    needs_cuda: ClassVar[bool] = False

    def send(self, contexts: ImageContexts) -> Any:
        raise NotImplementedError

    def receive(self, payload: Any, device: torch.device) -> tuple[ImageContexts, TransferStats]:
        raise NotImplementedError


# name -> "module:Class"; imported on first use so the CPU path never imports cupy or Ray.
REGISTRY: dict[str, str] = {
    "local": "bagel_ray.transport.local:LocalTransport",
    "object_store": "bagel_ray.transport.object_store:ObjectStoreTransport",
}
TRANSPORT_NAMES = ("auto", "object_store", "cuda_ipc", "nccl")


def make_transport(name: str) -> KVTransport:
    """The backend called `name`. `auto` and backends not available here fall back to the
    object store, with a warning that says why."""
    if name == "auto":
        name = "object_store"
    if name not in REGISTRY:
        if name in TRANSPORT_NAMES:
            log.warning("KV transport %r is not available in this build; falling back to 'object_store'", name)
            name = "object_store"
        else:
            raise ValueError(f"unknown KV transport {name!r}; choose from {', '.join(TRANSPORT_NAMES)}")
    module, _, cls = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)()
