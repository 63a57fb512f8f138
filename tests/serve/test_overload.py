"""Overload, deadlines and disconnects, on an app with tiny limits: the Thinker takes one
request and queues one (so two text requests in the system is the limit), the DiT takes
one and queues sixteen, and every request has a 3 s deadline.

- Under the limit nothing is refused; past it the surplus gets a 503 with Retry-After at
  once, and every answered request gets its own answer exactly once.
- A request past its deadline gets a 504, and its work stops: the replica is free for the
  next request long before the abandoned work would have ended. The same when the client
  disconnects, for plain and streamed requests.
"""

from __future__ import annotations

import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from PIL import Image

from bagel_ray.engine.request import GenerationRequest
from tests.serve.conftest import deploy_variant

TIMEOUT_S = 3.0
RETRY_AFTER_S = 2
CAPACITY = 2  # thinker: max_ongoing_requests 1 + max_queued_requests 1, one replica
LONG_TEXT = 16000  # tokens of a text answer that would take far longer than the deadline
FAST_S = 6.0  # a short request on a free replica answers well within this (the abandoned work: 10 s or more)


@pytest.fixture(scope="module")
def guarded(serve_app):
    from ray import serve

    app = deploy_variant(serve_app, "guarded", {
        "request_timeout_s": TIMEOUT_S,
        "retry_after_s": RETRY_AFTER_S,
        "thinker.max_ongoing_requests": 1,
        "thinker.max_queued_requests": 1,
        "thinker.max_model_len": LONG_TEXT + 64,
        "dit.max_ongoing_requests": 1,
        "dit.max_queued_requests": 16,
    })
    yield app
    serve.delete(app.name)


def chat(app, prompt: str, max_tokens: int, timeout: float = 60, **extra) -> requests.Response:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, **extra}
    return requests.post(app.url + "/v1/chat/completions", json=body, timeout=timeout)


def edit(app, steps: int, n: int = 1, timeout: float = 60) -> requests.Response:
    buf = io.BytesIO()
    Image.new("RGB", (128, 128), (90, 40, 200)).save(buf, format="PNG")
    return requests.post(app.url + "/v1/images/edits", files={"image": ("in.png", buf.getvalue(), "image/png")},
                         data={"prompt": "make it glow", "num_inference_steps": str(steps), "n": str(n), "seed": "3"},
                         timeout=timeout)


def timed(fn, *args, **kwargs) -> tuple[requests.Response, float]:
    t0 = time.monotonic()
    resp = fn(*args, **kwargs)
    return resp, time.monotonic() - t0


def test_no_refusal_under_the_limit_and_prompt_refusal_past_it(guarded, local):  # noqa: F811
    prompts = [f"client {c} asks question {q}" for c in range(8) for q in range(3)]
    want = {p: local.run(GenerationRequest("text2text", p, max_tokens=40)).text for p in set(prompts)}

    # Under the limit: CAPACITY clients, each waiting for its answer before the next request.
    def client(c: int) -> list[tuple[str, requests.Response]]:
        return [(p, chat(guarded, p, 40)) for p in prompts[c * 3:(c + 1) * 3]]

    with ThreadPoolExecutor(CAPACITY) as pool:
        answered = [pair for result in pool.map(client, range(CAPACITY)) for pair in result]
    assert [r.status_code for _, r in answered] == [200] * (CAPACITY * 3), [r.text for _, r in answered]
    for prompt, resp in answered:
        assert resp.json()["choices"][0]["message"]["content"] == want[prompt]

    # Past it: 8 clients at once. Each gets exactly one answer: its own text, or a 503 at once.
    start = threading.Barrier(8)

    def burst(c: int) -> tuple[str, requests.Response, float]:
        prompt = prompts[c * 3]
        start.wait()
        resp, seconds = timed(chat, guarded, prompt, 200 + c)
        return prompt, resp, seconds

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(burst, range(8)))
    statuses = [r.status_code for _, r, _ in results]
    assert set(statuses) <= {200, 503}, [r.text for _, r, _ in results]
    assert statuses.count(503) >= 1 and statuses.count(200) >= 1, statuses
    for prompt, resp, seconds in results:
        if resp.status_code == 503:
            assert resp.headers["Retry-After"] == str(RETRY_AFTER_S)
            assert resp.json()["error"]["type"] == "server_error"
            assert seconds < TIMEOUT_S, "a refusal must come at once, not after waiting"
        else:
            c = prompts.index(prompt) // 3
            expect = local.run(GenerationRequest("text2text", prompt, max_tokens=200 + c)).text
            assert resp.json()["choices"][0]["message"]["content"] == expect
    assert chat(guarded, "after the burst", 4).status_code == 200


def test_deadline_stops_text_decoding(guarded):
    resp, seconds = timed(chat, guarded, "talk for a long time", LONG_TEXT)
    assert resp.status_code == 504, resp.text
    assert "deadline" in resp.json()["error"]["message"]
    assert seconds < TIMEOUT_S + 2
    # The abandoned decode would hold the Thinker for many more seconds if it went on.
    after, took = timed(chat, guarded, "short", 4)
    assert after.status_code == 200 and took < FAST_S, (after.status_code, took)


def test_deadline_stops_denoising(guarded):
    resp, seconds = timed(edit, guarded, 500, n=8)  # eight 500-step edits, one at a time on one DiT
    assert resp.status_code == 504, resp.text
    after, took = timed(edit, guarded, 2)
    assert after.status_code == 200 and took < FAST_S, (after.status_code, took)


def test_disconnect_stops_the_work(guarded):
    for long_call, short_call in (
        (lambda: chat(guarded, "talk for a long time", LONG_TEXT, timeout=1.0), lambda: chat(guarded, "short", 4)),
        (lambda: edit(guarded, 500, n=8, timeout=1.0), lambda: edit(guarded, 2)),
    ):
        with pytest.raises(requests.exceptions.ReadTimeout):
            long_call()  # the client gives up after 1 s and closes the connection
        after, took = timed(short_call)
        assert after.status_code == 200 and took < FAST_S, (after.status_code, took)


def test_streams_stop_on_disconnect_and_deadline(guarded):
    body = {"messages": [{"role": "user", "content": "stream a lot"}], "max_tokens": LONG_TEXT, "stream": True}
    with requests.post(guarded.url + "/v1/chat/completions", json=body, stream=True, timeout=60) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        for _ in range(6):
            next(lines)  # some deltas arrived; now hang up
    after, took = timed(chat, guarded, "short", 4)
    assert after.status_code == 200 and took < FAST_S, (after.status_code, took)

    with requests.post(guarded.url + "/v1/chat/completions", json=body, stream=True, timeout=60) as resp:
        events = [line[6:] for line in resp.iter_lines() if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == 504 and "deadline" in error["message"]
    after, took = timed(chat, guarded, "short", 4)
    assert after.status_code == 200 and took < FAST_S, (after.status_code, took)
