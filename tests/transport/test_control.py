"""The control channel's framing and its polling window (`ControlServer.expect`), on CPU."""

from __future__ import annotations

import queue
import time

from bagel_ray.transport.control import ControlClient, ControlServer


def serving() -> tuple[ControlServer, ControlClient, queue.Queue]:
    got: queue.Queue = queue.Queue()
    server = ControlServer("k", lambda message, answer: got.put(message["n"]), "127.0.0.1")
    return server, ControlClient(server.address, "k", 5.0), got


def cpu_seconds_over(seconds: float) -> float:
    """CPU time this process spends while the test sleeps `seconds`: its threads' work."""
    start = time.process_time()
    time.sleep(seconds)
    return time.process_time() - start


def test_messages_split_or_joined_on_the_wire_arrive_whole_and_in_order():
    server, client, got = serving()
    try:
        client._sock.sendall(b'{"key": "k", "n": 1}\n{"key": "k", "n": 2}\n{"key": "k", ')
        time.sleep(0.05)
        client._sock.sendall(b'"n": 3}\n')
        server.expect(5.0)  # polling reads the same
        client.notify({"n": 4})
        assert [got.get(timeout=5) for _ in range(4)] == [1, 2, 3, 4]
    finally:
        server.close()


def test_after_expect_the_last_connection_polls_until_its_message_or_the_window_ends():
    server, client, got = serving()
    try:
        client.notify({"n": 1})  # now the last connection
        assert got.get(timeout=5) == 1
        assert cpu_seconds_over(0.3) < 0.1  # asleep between messages
        server.expect(30.0)
        assert cpu_seconds_over(0.3) > 0.1  # woken, and polling
        client.notify({"n": 2})
        assert got.get(timeout=5) == 2
        assert cpu_seconds_over(0.3) < 0.1  # the expected message came: asleep again
        server.expect(0.2)
        time.sleep(0.3)
        assert cpu_seconds_over(0.3) < 0.1  # the window ended without one
        client.notify({"n": 3})
        assert got.get(timeout=5) == 3
    finally:
        server.close()


def test_only_a_connection_that_has_spoken_polls():
    server, client, got = serving()
    try:
        server.expect(30.0)  # nobody has sent anything yet
        assert cpu_seconds_over(0.3) < 0.1
        client.notify({"n": 1})
        assert got.get(timeout=5) == 1
    finally:
        server.close()
