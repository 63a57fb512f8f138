"""The control channel of the GPU-direct transport: a TCP connection from each receiver to
each sender it pulls from, over which the receiver says "send me handoff X" and "I am done
with X".

Why not a Ray call into the sender replica (`__ray_call__`, what the first version did): it
took ~2 ms from the receiver's call to the sender's NCCL send on an idle pair, more than the
transfer of a 500 MB context over NVLink (~1.4 ms), so it decided the handoff's speed. A
message on an open TCP connection to a thread of the sender's takes tens of microseconds,
and a sender that dies closes the connection at once, which the receiver notices while it
waits (Ray may take a minute to call a dead replica dead).

Messages are single JSON lines (never pickles: the port is reachable from the node's
network). Each carries the sender transport's key, a random 128-bit id that only holders of
one of its payloads know; a message with another key closes the connection. Requests get a
one-line JSON answer, notices none. The handler answers through a callback, so it answers
when it chooses (the sender posts its NCCL send, then says it has).

Why the sender may spin: on an idle pair, a thread asleep in `poll` saw the receiver's
request 0.16-0.22 ms after the receive began; one that had polled without sleeping since
the payload went out, at 0.12-0.19 ms, and it posted its NCCL send sooner after it (two 2x H200
hosts, benchmarks/RESULTS.md, "KV handoff"). So when a payload has just gone
out (`expect`), the connection that sent the last message polls its socket instead of
sleeping, until as many messages came as were expected or the window closed: one thread, for
a bounded time. The price, on a sender whose other threads are busy: the poller takes the GIL
back after every poll, and a thread running small torch ops (each gives the GIL up) ran at
30-40 % of its speed meanwhile (CPU probe, 2 cores). The window closes when the request
comes, ~1 ms after the payload left in `kv_transfer`; so a busy Thinker loses well under a
millisecond a handoff. Napping while the process's other threads used CPU was tried and
dropped: the handoff got slower than without polling, likely because the process's own Ray
and NCCL threads made an idle sender look busy (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

MAX_LINE = 1 << 16  # a message is a few hundred bytes (a NCCL unique id is 256 hex digits)

Answer = Callable[[dict[str, Any]], None]
Handler = Callable[[dict[str, Any], Answer], None]


class ControlError(ConnectionError):
    """The sender's control channel failed: refused, closed, or silent past the deadline."""


def _tuned(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one small message each way: no Nagle delay
    return sock


class ControlServer:
    """The sender's side: accepts receivers on `host` and runs `handler(message, answer)` for
    each message in a thread per connection (`answer` writes the one-line reply)."""

    def __init__(self, key: str, handler: Handler, host: str) -> None:
        self.key = key
        self._handler = handler
        self._listener = socket.create_server((host, 0))
        self.address: tuple[str, int] = (host, self._listener.getsockname()[1])
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._expected = 0  # messages announced by `expect` and not come yet
        self._spin_until = 0.0  # time.monotonic
        self._last: socket.socket | None = None  # the connection that sent the last message
        self._wakers: dict[socket.socket, int] = {}  # each connection's pipe that `expect` wakes it by
        threading.Thread(target=self._accept, name="kv-control-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed
                return
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._connections.add(conn)
            threading.Thread(target=self._serve, args=(_tuned(conn),), name="kv-control", daemon=True).start()

    def expect(self, within_s: float) -> None:
        """A message is likely within `within_s` (a payload went out): until it comes, or
        until then, the connection that sent the last message polls instead of sleeping."""
        with self._lock:
            self._expected += 1
            self._spin_until = max(self._spin_until, time.monotonic() + within_s)
            waker = self._wakers.get(self._last)
            if waker is not None:  # it may be asleep in `poll`; under the lock, so the pipe is open
                try:
                    os.write(waker, b"\0")
                except BlockingIOError:  # full: it has been woken already
                    pass

    def _spinning(self, conn: socket.socket) -> bool:
        return conn is self._last and self._expected > 0 and time.monotonic() < self._spin_until

    def _lines(self, conn: socket.socket) -> Iterator[bytes]:
        """The connection's messages, a line each. Between them the thread sleeps in `poll`
        on the socket and its waker, or polls without sleeping while `_spinning`."""
        wake, waker = os.pipe()
        os.set_blocking(wake, False)
        os.set_blocking(waker, False)
        poller = select.poll()  # not select.select: a Ray worker's descriptors may pass 1024
        poller.register(conn, select.POLLIN)
        poller.register(wake, select.POLLIN)
        with self._lock:
            self._wakers[conn] = waker
        pending = bytearray()
        try:
            while True:
                end = pending.find(b"\n")
                if end >= 0:
                    line = bytes(pending[:end + 1])
                    del pending[:end + 1]
                    with self._lock:
                        self._expected = max(0, self._expected - 1)
                        if not self._expected:
                            self._spin_until = 0.0
                        self._last = conn
                    yield line
                    continue
                if len(pending) > MAX_LINE:
                    raise ValueError(f"a message longer than {MAX_LINE} bytes")
                events = dict(poller.poll(0 if self._spinning(conn) else None))
                if wake in events:
                    os.read(wake, 64)
                if conn.fileno() in events:
                    chunk = conn.recv(MAX_LINE)
                    if not chunk:
                        return
                    pending += chunk
        finally:
            with self._lock:
                self._wakers.pop(conn, None)
                os.close(wake)
                os.close(waker)

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                for line in self._lines(conn):
                    message = json.loads(line)
                    if not isinstance(message, dict) or message.get("key") != self.key:
                        log.warning("KV control: a message without this sender's key; closing the connection")
                        return
                    self._handler(message, lambda reply: conn.sendall(json.dumps(reply).encode() + b"\n"))
        except OSError as exc:  # the receiver went away, or the server closed
            log.debug("KV control connection ended: %s", exc)
        except Exception as exc:  # a malformed message (not JSON, a field missing): drop this connection only
            log.warning("KV control: closing a connection after a bad message (%s: %s)", type(exc).__name__, exc)
        finally:
            with self._lock:
                self._connections.discard(conn)
                if self._last is conn:
                    self._last = None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections = list(self._connections)
        self._listener.close()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class ControlClient:
    """The receiver's connection to one sender. Not shared between threads at once: the
    transport uses it under the pair's lock (requests) or its own lock (notices)."""

    def __init__(self, address: tuple[str, int], key: str, timeout_s: float) -> None:
        self.key = key
        try:
            self._sock = _tuned(socket.create_connection(tuple(address), timeout=timeout_s))
        except OSError as exc:
            raise ControlError(f"cannot reach the sender at {address[0]}:{address[1]}: {exc}") from None
        self._lines = self._sock.makefile("rb")
        self._lock = threading.Lock()

    def notify(self, message: dict[str, Any]) -> None:
        """Send `message`; for a request, `answer` reads the reply (the caller may do other
        work in between: the reply waits in the socket)."""
        with self._lock:
            try:
                self._sock.settimeout(1.0)
                self._sock.sendall(json.dumps({**message, "key": self.key}).encode() + b"\n")
            except OSError as exc:
                raise ControlError(f"the connection to the sender failed: {exc}") from None

    def answer(self, timeout_s: float) -> dict[str, Any]:
        with self._lock:
            try:
                self._sock.settimeout(max(timeout_s, 1e-3))
                line = self._lines.readline(MAX_LINE)
            except TimeoutError:
                raise ControlError(f"the sender did not answer within {timeout_s:.1f}s") from None
            except OSError as exc:
                raise ControlError(f"the connection to the sender failed: {exc}") from None
        if not line:
            raise ControlError("the sender closed the connection")
        return json.loads(line)

    def closed(self) -> bool:
        """Whether the sender has closed the connection (or it broke), without waiting. Only
        meaningful between requests, when the sender has nothing to say."""
        try:
            poller = select.poll()
            poller.register(self._sock, select.POLLIN)
            return bool(poller.poll(0)) and not self._sock.recv(1, socket.MSG_PEEK)
        except OSError:
            return True

    def close(self) -> None:
        self._lines.close()
        self._sock.close()
