"""The ingress under hostile input (issue 25), over real HTTP on the session's tiny app: no
request may stall the driver's event loop, so `/health` answers within 100 ms of its usual
latency (`health_bound`) while the worst request the body limit lets in is being refused;
malformed input gets its JSON error."""

from __future__ import annotations

import io
import json
import os
import select
import socket
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image

CHAT = "/v1/chat/completions"
IMAGES = "/v1/images/generations"
EDITS = "/v1/images/edits"
BODY_LIMIT = 32 * 1024 * 1024  # tiny.yaml keeps the default max_request_bytes
# What a request being refused may add to /health's usual latency (its baseline). On an
# oversubscribed host (the shared 2-core test machine runs at loads of 6-12) every CPU-bound
# interval, and so any stall, stretches by about the oversubscription: the bound is scaled by
# it. Without the fixes, the 31 MiB prompt stalled /health for over a minute.
HEALTH_S = 0.1


def health_bound(baseline: list[float]) -> float:
    """HEALTH_S, stretched by the host's oversubscription, on top of the slowest /health of a
    baseline measured just before with nothing else sent."""
    oversubscribed = max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
    return HEALTH_S * oversubscribed + max(baseline)


def health_latencies_during(app, fn) -> tuple[object, list[float]]:
    """`fn()`'s result, and the latency of every `/health` asked (one after another, on one
    connection) while it ran."""
    done = threading.Event()
    latencies: list[float] = []
    result: list = []

    def poll() -> None:
        with requests.Session() as session:
            session.get(app.url + "/health", timeout=10)  # connected before fn starts
            started.set()
            while not done.is_set():
                t0 = time.perf_counter()
                assert session.get(app.url + "/health", timeout=10).status_code == 200
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.005)

    started = threading.Event()
    poller = threading.Thread(target=poll)
    poller.start()
    started.wait(30)
    try:
        result.append(fn())
    finally:
        done.set()
        poller.join()
    return result[0], latencies


def test_the_largest_prompt_the_body_limit_allows_is_refused_at_once_and_health_answers(serve_app):
    """31 MiB of prompt: refused (422 naming the prompt) by the cheap bound, before any
    tokenizing, within seconds; `/health` meanwhile within `health_bound` plus the one parse of
    the body every time."""
    prompt = "a" * (BODY_LIMIT - 1024)
    body = ('{"prompt": "' + prompt + '", "size": "32x32"}').encode()
    assert len(body) < BODY_LIMIT

    def send():
        t0 = time.perf_counter()
        resp = requests.post(serve_app.url + IMAGES, data=body, headers={"content-type": "application/json"}, timeout=120)
        return resp, time.perf_counter() - t0

    _, baseline = health_latencies_during(serve_app, lambda: time.sleep(1.0))
    (resp, took), latencies = health_latencies_during(serve_app, send)
    assert resp.status_code == 422 and resp.json()["error"]["param"] == "prompt", resp.text[:300]
    assert "characters" in resp.json()["error"]["message"]
    assert took < 10, took
    print(f"MEASURED 31 MiB prompt: refused in {took:.2f} s; /health max {max(latencies) * 1e3:.0f} ms over "
          f"{len(latencies)} (baseline max {max(baseline) * 1e3:.0f} ms), load {os.getloadavg()[0]:.1f}")
    # One C call cannot be split: json.loads of this body holds the GIL for its whole length (in
    # a worker thread, so the loop answers again right after). On an idle core that is tens of
    # ms; on the 2-core CI host it alone reached 140 ms once: the bound allows it, measured here.
    t0 = time.perf_counter()
    json.loads(body)
    one_parse = time.perf_counter() - t0
    bound = health_bound(baseline) + one_parse
    assert len(latencies) >= 3 and max(latencies) < bound, (sorted(latencies)[-5:], bound)
    # the same through chat names `messages`
    resp = requests.post(serve_app.url + CHAT, json={"messages": [{"role": "user", "content": prompt[:200_000]}]}, timeout=120)
    assert resp.status_code == 422 and resp.json()["error"]["param"] == "messages", resp.text[:300]


def test_a_prompt_under_the_cheap_bound_is_counted_exactly_where_it_is_tokenized(serve_app):
    """Under the character bound, the Thinker's exact count decides (and names the field)."""
    info = serve_app.handle.model_info.remote().result()
    fits = "hello " * 8
    resp = requests.post(serve_app.url + CHAT, json={"messages": [{"role": "user", "content": fits}], "max_tokens": 2}, timeout=120)
    assert resp.status_code == 200, resp.text
    long = "x y " * info.max_model_len  # under max_prompt_chars, over max_model_len tokens
    assert len(long) < info.max_prompt_chars(True)
    for path, body, param in ((CHAT, {"messages": [{"role": "user", "content": long}], "max_tokens": 1}, "messages"),
                              (IMAGES, {"prompt": long, "size": "32x32", "num_inference_steps": 2}, "prompt")):
        resp = requests.post(serve_app.url + path, json=body, timeout=120)
        assert resp.status_code == 422 and resp.json()["error"]["param"] == param, resp.text[:300]
        assert "tokens" in resp.json()["error"]["message"]


def noise_jpeg(side: int) -> bytes:
    rng = np.random.default_rng(5)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_large_images_are_decoded_off_the_event_loop(serve_app):
    """A 4096 x 4096 JPEG (the pixel limit) uploaded for an edit: `/health` stays fast while it
    is decoded (and resized by the DiT)."""
    data = noise_jpeg(4096)

    def send():
        files = {"image": ("big.jpg", data, "image/jpeg")}
        return requests.post(serve_app.url + EDITS, files=files, data={"prompt": "x", "num_inference_steps": "2"}, timeout=300)

    _, baseline = health_latencies_during(serve_app, lambda: time.sleep(1.0))
    resp, latencies = health_latencies_during(serve_app, send)
    assert resp.status_code == 200, resp.text[:300]
    print(f"MEASURED 4096^2 JPEG edit: /health max {max(latencies) * 1e3:.0f} ms over {len(latencies)} "
          f"(baseline max {max(baseline) * 1e3:.0f} ms), load {os.getloadavg()[0]:.1f}")
    assert len(latencies) >= 3 and max(latencies) < health_bound(baseline), (sorted(latencies)[-5:], health_bound(baseline))


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [5000, 100_000])
def test_deeply_nested_json_is_a_400(serve_app, depth):
    body = '{"messages": [{"role": "user", "content": "hi"}], "user": ' + nested(depth) + "}"
    resp = requests.post(serve_app.url + CHAT, data=body, headers={"content-type": "application/json"}, timeout=60)
    assert resp.status_code == 400, resp.text[:300]
    assert "nested too deeply" in resp.json()["error"]["message"]
    png = io.BytesIO()
    Image.new("RGB", (16, 16)).save(png, format="PNG")
    resp = requests.post(serve_app.url + EDITS, files={"image": ("a.png", png.getvalue(), "image/png")},
                         data={"prompt": "x", "cfg_interval": nested(depth)}, timeout=60)
    assert resp.status_code == 422 and resp.json()["error"]["param"] == "cfg_interval", resp.text[:300]


def test_unknown_routes_and_wrong_methods_answer_the_json_error_shape(serve_app):
    for method, path, status in (("get", "/v1/nothing-here", 404), ("delete", "/v1/models", 405),
                                 ("get", CHAT, 405), ("put", "/health", 405)):
        resp = requests.request(method, serve_app.url + path, timeout=30)
        assert resp.status_code == status, (method, path, resp.text)
        error = resp.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error" and "detail" not in resp.json()


# -- a narrow ingress: slow uploads, its own admission, /health kept out of it ----------------

BODY_TIMEOUT_S = 10.0  # the uploads' hold: long enough for what the test asks meanwhile, under load


@pytest.fixture(scope="module")
def narrow(serve_app):
    """Two API slots. Serve's queue before the ingress keeps its default: Serve counts a request
    as queued from its arrival at the proxy until the replica has taken it, so with
    `ingress.max_queued_requests: 1` the second of two uploads sent together got Serve's own
    503 and never held a slot (what failed this test in full-suite runs)."""
    from ray import serve

    from tests.serve.conftest import deploy_variant

    app = deploy_variant(serve_app, "narrow", {"ingress.max_ongoing_requests": 2, "body_timeout_s": BODY_TIMEOUT_S,
                                               "retry_after_s": 4})
    yield app
    serve.delete(app.name)


def raw_post(app, path: str, length: int, body: bytes = b"", close: bool = False) -> socket.socket:
    """A POST that declares `length` bytes of body and sends only `body`, then nothing."""
    host, port = app.url.split("//")[1].split("/")[0].split(":")
    conn = socket.create_connection((host, int(port)), timeout=60)
    head = [f"POST /{app.name}{path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json",
            f"Content-Length: {length}"] + (["Connection: close"] if close else [])
    conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    return conn


def trickling_upload(app, path: str) -> socket.socket:
    """A POST that declares 1000 bytes of body and sends 10, then nothing."""
    return raw_post(app, path, 1000, b'{"prompt":')


def answer_of(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def unanswered(conn: socket.socket) -> bool:
    return not select.select([conn], [], [], 0)[0]


def api_slots_full(app) -> bool:
    """Whether the ingress's API admission is full, asked without taking a slot: a POST declaring
    a body over `max_request_bytes` is refused with 413 from its header alone, within the slot
    and without waiting for anything, so it never holds a slot an upload could need; when no
    slot is free it gets the admission's JSON 503 (not Serve's plain-text one)."""
    conn = raw_post(app, CHAT, BODY_LIMIT + 1, close=True)
    try:
        answer = b""
        while chunk := conn.recv(4096):
            answer += chunk
    finally:
        conn.close()
    assert answer.startswith((b"HTTP/1.1 413", b"HTTP/1.1 503")), answer[:300]
    if answer.startswith(b"HTTP/1.1 413"):
        return False
    body = answer.partition(b"\r\n\r\n")[2]  # the admission's JSON 503, not Serve's plain text
    assert body.startswith(b"{") and json.loads(body)["error"]["type"] == "server_error", answer[:300]
    return True


def test_slow_uploads_time_out_and_never_shut_out_health(narrow):
    """Two uploads that stop after 10 bytes hold both API slots: meanwhile a chat gets the JSON
    503 at once and `/health` is answered; at `body_timeout_s` they get their 408, and the next
    chat is served."""
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    ok = requests.post(narrow.url + CHAT, json=chat, timeout=60)
    assert ok.status_code == 200, ok.text
    t0 = time.monotonic()
    slow = [trickling_upload(narrow, IMAGES) for _ in range(2)]  # the API routes' whole admission
    while not api_slots_full(narrow):  # how soon both reach the ingress depends on the host's load
        assert all(unanswered(conn) for conn in slow), [answer_of(conn)[:200] for conn in slow if not unanswered(conn)]
        assert time.monotonic() - t0 < BODY_TIMEOUT_S, "the uploads never held both slots"
        time.sleep(0.05)
    held = time.monotonic()  # both uploads were admitted by now, and their body timers started
    full = requests.post(narrow.url + CHAT, json=chat, timeout=60)
    assert full.status_code == 503 and full.headers["Retry-After"] == "4", full.text
    assert full.json()["error"]["type"] == "server_error"  # the API's JSON, not Serve's plain text
    for _ in range(3):  # /health is out of the admission
        assert requests.get(narrow.url + "/health", timeout=60).status_code == 200
    # all of the above while the uploads still held the slots
    assert all(unanswered(conn) for conn in slow) and api_slots_full(narrow)
    for conn in slow:
        head = answer_of(conn)
        conn.close()
        assert head.startswith(b"HTTP/1.1 408"), head[:200]
    answered = time.monotonic()
    # admitted after t0 and by `held`, each timed out body_timeout_s later (+ the answer's way back)
    assert answered - t0 >= BODY_TIMEOUT_S and answered - held < BODY_TIMEOUT_S + 10, (answered - t0, answered - held)
    assert not api_slots_full(narrow)
    again = requests.post(narrow.url + CHAT, json=chat, timeout=60)
    assert again.status_code == 200, again.text
