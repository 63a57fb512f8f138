"""The NCCL communicators of one side of a GPU-direct transport, one per peer replica.

A pair of replicas (sender, receiver) shares a two-rank communicator, made lazily by its first
handoff. Each side keeps its pairs in a `Links` table by the peer's key, with one lock per pair
so that both sides post their operations in the same order and a pair's communicator is made
or dropped by one thread. A failed pair is aborted and dropped (the next handoff makes a new
one); a pair unused for a while is aborted by `sweep`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from bagel_ray.transport.nccl import Communicator, TransferTimeout

log = logging.getLogger(__name__)

SENDER_RANK, RECEIVER_RANK = 0, 1


class PeerRefused(RuntimeError):
    """The sender answered but would not send (no NCCL there, or it dropped the pair's
    communicator); the handoff goes through the object store."""


@dataclass
class Link:
    """A pair's NCCL communicator, and the key both sides know it by."""

    comm: Communicator
    key: str
    last_used: float = field(default_factory=time.monotonic)


class Links:
    """One side's pairs: `side` is "send" (by receiver key) or "recv" (by sender key)."""

    def __init__(self, side: str) -> None:
        self.side = side
        self._table: dict[str, Link] = {}
        self._lock = threading.Lock()
        self._pair_locks: dict[str, threading.Lock] = {}

    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, key: str) -> bool:
        return key in self._table

    def get(self, key: str) -> Link | None:
        with self._lock:
            return self._table.get(key)

    def put(self, key: str, link: Link) -> None:
        with self._lock:
            self._table[key] = link

    @contextmanager
    def pair(self, key: str, deadline: float) -> Iterator[None]:
        """One handoff at a time per pair: both sides post their operations in the same order,
        and a pair's communicator is made or dropped by one thread."""
        with self._lock:
            lock = self._pair_locks.setdefault(key, threading.Lock())
        if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TransferTimeout(f"another handoff with peer {key[:8]} held the pair past the deadline")
        try:
            yield
        finally:
            lock.release()

    def drop(self, key: str, link: Link | None = None) -> None:
        """Abort `link` (or whatever `key` has) and remove it from the table if it is there."""
        with self._lock:
            current = self._table.get(key)
            if current is not None and (link is None or current is link):
                del self._table[key]
                link = current
        if link is not None:
            link.comm.abort()

    def sweep(self, idle_s: float) -> None:
        """Abort the pairs unused for `idle_s` (not one a handoff holds)."""
        now = time.monotonic()
        with self._lock:
            idle = [(k, link) for k, link in self._table.items() if now - link.last_used > idle_s]
        for key, link in idle:
            lock = self._pair_locks.get(key)
            if lock is not None and not lock.acquire(blocking=False):
                continue  # in use
            try:
                log.info("KV transport: dropping the NCCL communicator with %s %s, idle %.0fs",
                         "sender" if self.side == "recv" else "receiver", key[:8], now - link.last_used)
                self.drop(key, link)
            finally:
                if lock is not None:
                    lock.release()

    def abort_all(self) -> None:
        """Abort every pair. Takes no lock: it runs in finalizers, at any point of any thread."""
        links = list(self._table.values())
        self._table.clear()
        for link in links:
            link.comm.abort()


def abort_all(*tables: Links) -> None:
    """Abort every pair of the tables (a transport's finalizer: it holds no transport)."""
    for table in tables:
        table.abort_all()
