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
"""

from __future__ import annotations

import json
import logging
import select
import socket
import threading
from collections.abc import Callable
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

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn, conn.makefile("rb") as lines:
                while line := lines.readline(MAX_LINE):
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
            readable, _, _ = select.select([self._sock], [], [], 0)
            return bool(readable) and not self._sock.recv(1, socket.MSG_PEEK)
        except OSError:
            return True

    def close(self) -> None:
        self._lines.close()
        self._sock.close()
