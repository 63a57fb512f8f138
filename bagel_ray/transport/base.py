"""One contract for moving image-generation contexts (`ImageContexts`) between stages.

A transport turns contexts into a picklable payload on the sending side (`send`) and back
into tensors on the receiving side (`receive`). It knows the KV layout, never the model.
Backends declare what they can do as class attributes; `make_transport` picks one by name
from a lazy registry and logs when a backend cannot do its job in this process.

Backends:
- `local`: same process, the contexts object itself.
- `object_store`: one packed host buffer through the Ray object store (any two processes).
- `cuda_ipc`, `nccl`, `auto` (`direct.py`): GPU-direct. The sender keeps its GPU tensors and
  sends only their layout and its identity; the receiver maps them (CUDA IPC, same GPU) or
  pulls them over NCCL (another GPU, any node), and pulls them through the object store
  when neither works for the pair. `auto` picks the fastest that works for each handoff.
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
    """Bytes and seconds of one handoff (the sending and the receiving halves), and the
    route the bytes took (`local`, `object_store`, `cuda_ipc`, `nccl`, or `fetch`: pulled
    through the object store from the sender). `phases`: seconds of the receiving half's
    parts, where a route times them (for benchmarks and tuning)."""

    nbytes: int
    send_s: float
    receive_s: float = 0.0
    route: str = ""
    phases: tuple[tuple[str, float], ...] = ()


class KVTransport:
    name: ClassVar[str] = "base"
    crosses_processes: ClassVar[bool] = False
    needs_cuda: ClassVar[bool] = False

    def send(self, contexts: ImageContexts) -> Any:
        raise NotImplementedError

    def receive(self, payload: Any, device: torch.device) -> tuple[ImageContexts, TransferStats]:
        raise NotImplementedError

    def release(self, payload: Any) -> None:
        """A DiT replica of several ranks: every rank holds its share of `payload` (some got it
        from the payload themselves), so what the sender keeps for it may go. Nothing to do
        for most backends."""

    def close(self) -> None:
        """Give back what the transport holds (communicators, contexts waiting to be pulled)."""


# name -> "module:Class"; imported on first use so the CPU path never imports NCCL, and
# the local one not Ray.
REGISTRY: dict[str, str] = {
    "local": "bagel_ray.transport.local:LocalTransport",
    "object_store": "bagel_ray.transport.object_store:ObjectStoreTransport",
    "auto": "bagel_ray.transport.direct:AutoTransport",
    "cuda_ipc": "bagel_ray.transport.direct:CudaIpcTransport",
    "nccl": "bagel_ray.transport.direct:NcclTransport",
}
TRANSPORT_NAMES = ("auto", "object_store", "cuda_ipc", "nccl")


def make_transport(name: str, ranks: int = 1) -> KVTransport:
    """The backend called `name`, for a receiving DiT replica of `ranks` ranks (each rank then
    gets its share from the payload itself where the backend can: `transport/shares.py`). A
    backend that needs CUDA still works in a process without it (its contexts go through the
    object store), with a warning that says so."""
    if name not in REGISTRY:
        raise ValueError(f"unknown KV transport {name!r}; choose from {', '.join(TRANSPORT_NAMES)}")
    module, _, cls_name = REGISTRY[name].partition(":")
    cls = getattr(importlib.import_module(module), cls_name)
    if cls.needs_cuda and not torch.cuda.is_available():
        log.warning("KV transport %r needs CUDA, which this process lacks: the contexts it sends and receives "
                    "go through the object store", name)
    return cls(ranks=ranks) if ranks > 1 else cls()
