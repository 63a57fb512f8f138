"""Contexts a sender keeps for its receivers to pull, bounded in bytes and in age.

A GPU-direct sender does not push its KV anywhere: it keeps the tensors here under a handoff
id and sends only their description. The receiver then maps them (CUDA IPC), has them sent
(NCCL) or fetched through the object store, and releases them. What nobody pulls leaves by
age (`ttl_s`), and when the held bytes pass `max_bytes` the oldest parcels leave first; a
receiver that asks for a parcel that left is told it is gone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bagel_ray.transport.layout import ContextsLayout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Parcel:
    tensors: tuple[torch.Tensor, ...]  # one per context, in layout order
    layout: ContextsLayout
    born: float

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes


class Outbox:
    def __init__(self, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_bytes <= 0 or ttl_s <= 0:
            raise ValueError(f"max_bytes ({max_bytes}) and ttl_s ({ttl_s}) must be positive")
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._parcels: OrderedDict[str, Parcel] = OrderedDict()  # oldest first
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, key: str, tensors: list[torch.Tensor], layout: ContextsLayout) -> None:
        """Keep `tensors` under `key`. Older parcels leave while the total passes `max_bytes`;
        the new one always stays (the bound caps what waits, not a single handoff)."""
        parcel = Parcel(tuple(tensors), layout, self._clock())
        with self._lock:
            if key in self._parcels:
                raise KeyError(f"handoff {key} is already in the outbox")
            self._expire()
            self._parcels[key] = parcel
            self._bytes += parcel.nbytes
            while self._bytes > self.max_bytes and len(self._parcels) > 1:
                old_key, old = self._parcels.popitem(last=False)
                self._bytes -= old.nbytes
                log.warning("KV outbox over %d bytes: dropped handoff %s (%d bytes, waited %.1fs); "
                            "its request will be retried", self.max_bytes, old_key, old.nbytes, parcel.born - old.born)

    def peek(self, key: str) -> Parcel | None:
        """The parcel, left in place; None once it is gone (taken, too old, or evicted)."""
        with self._lock:
            self._expire()
            return self._parcels.get(key)

    def take(self, key: str) -> Parcel | None:
        """The parcel, removed; None once it is gone."""
        with self._lock:
            self._expire()
            parcel = self._parcels.pop(key, None)
            if parcel is not None:
                self._bytes -= parcel.nbytes
            return parcel

    def sweep(self) -> None:
        """Drop the parcels past their age now (every other call does it too)."""
        with self._lock:
            self._expire()

    def clear(self) -> None:
        with self._lock:
            self._parcels.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._parcels)

    def __contains__(self, key: str) -> bool:
        return self.peek(key) is not None

    def _expire(self) -> None:
        now = self._clock()
        while self._parcels:
            key, oldest = next(iter(self._parcels.items()))
            if now - oldest.born < self.ttl_s:
                return
            del self._parcels[key]
            self._bytes -= oldest.nbytes
            log.warning("KV outbox: handoff %s was not pulled within %.0fs; dropped (%d bytes)",
                        key, self.ttl_s, oldest.nbytes)
