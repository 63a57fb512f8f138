"""Same-process handoff: the contexts object itself, no copy."""

from __future__ import annotations

import torch

from bagel_ray.engine.kv_context import ImageContexts
from bagel_ray.transport.base import KVTransport, TransferStats


class LocalTransport(KVTransport):
    name = "local"

    def __init__(self, ranks: int = 1) -> None:
        """`ranks` changes nothing: every rank of a replica is another process, none is local."""

    def send(self, contexts: ImageContexts) -> ImageContexts:
        return contexts

    def receive(self, payload: ImageContexts, device: torch.device) -> tuple[ImageContexts, TransferStats]:
        if payload.gen.kv.device != torch.device(device):
            raise ValueError(f"local transport cannot move contexts from {payload.gen.kv.device} to {device}")
        return payload, TransferStats(payload.nbytes, 0.0, 0.0, self.name)
