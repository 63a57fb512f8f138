"""The tiny app across a real multi-node Ray cluster on one machine (tests/serve/multinode.py):
each stage on its own node type, every modality over HTTP equal to one node's output (bit for
bit, as tests/serve/test_app.py compares), and the KV handoff crossing nodes through the
object store, as the DiT's `bagel_kv_handoffs_total` counter records it per request."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest

from bagel_ray.engine.request import GenerationRequest
from tests.serve import multinode
from tests.serve.test_app import data_url, png_pixels, post, sse_events

HANDOFFS = "ray_bagel_kv_handoffs_total"


@pytest.fixture(scope="module")
def cluster_app(tiny_cache):
    pytest.importorskip("ray")
    app = multinode.start(tiny_cache)
    yield app
    multinode.stop(app)


def handoffs(app, nodes) -> dict[tuple[str, str], float]:
    """(route, crossed_nodes) -> handoffs the DiT replicas on `nodes` have received."""
    total: dict[tuple[str, str], float] = {}
    for node in nodes:
        for labels, value in app.metric(node, HANDOFFS).items():
            tags = dict(labels)
            key = (tags["route"], tags["crossed_nodes"])
            total[key] = total.get(key, 0.0) + value
    return total


def wait_for_handoffs(app, nodes, want: dict[tuple[str, str], float], timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while (got := handoffs(app, nodes)) != want and time.monotonic() < deadline:
        time.sleep(1)
    return got


def test_each_stage_runs_on_its_node_type(cluster_app):
    app = cluster_app
    assert [r["node_id"] for r in app.replicas("Driver")] == [app.head.node_id]
    assert [r["node_id"] for r in app.replicas("Thinker")] == [app.thinker.node_id]
    assert sorted(r["node_id"] for r in app.replicas("DiT")) == sorted(n.node_id for n in app.dits)


def test_every_modality_over_http_matches_one_node(cluster_app, local, picture):
    """Each request's output equals LocalPipeline's (what the single-node app gives too), and
    each image request with a handoff (text2img, think, img2img: edit contexts are built on
    the Thinker here) took the object store across nodes."""
    app = cluster_app
    before = handoffs(app, app.dits)
    crossed = 0

    body = {"messages": [{"role": "user", "content": "Tell me a fun fact about the moon."}], "max_tokens": 12, "seed": 5}
    resp = post(app, "/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    want = local.run(GenerationRequest("text2text", "Tell me a fun fact about the moon.", max_tokens=12, seed=5))
    assert resp.json()["choices"][0]["message"]["content"] == want.text

    content = [{"type": "text", "text": "What is in the picture?"}, {"type": "image_url", "image_url": {"url": data_url(picture)}}]
    resp = post(app, "/v1/chat/completions", json={"messages": [{"role": "user", "content": content}], "max_tokens": 10})
    assert resp.status_code == 200, resp.text
    want = local.run(GenerationRequest("img2text", "What is in the picture?", image=picture, max_tokens=10))
    assert resp.json()["choices"][0]["message"]["content"] == want.text

    body = {"prompt": "A red fox sleeps under an old oak tree.", "size": "64x48", "num_inference_steps": 6, "seed": 7, "cfg_img_scale": 1.5}
    resp = post(app, "/v1/images/generations", json=body)
    assert resp.status_code == 200, resp.text
    want = local.run(GenerationRequest("text2img", body["prompt"], seed=7, num_inference_steps=6, height=48, width=64, cfg_img_scale=1.5))
    assert np.array_equal(png_pixels(resp.json()["data"][0]["b64_json"]), np.asarray(want.image))
    crossed += 1

    body = {"messages": [{"role": "user", "content": "A lighthouse at dusk"}], "modalities": ["image"], "think": True,
            "max_think_tokens": 8, "num_inference_steps": 4, "seed": 3, "size": "32x32"}
    resp = post(app, "/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    parts = resp.json()["choices"][0]["message"]["content"]
    want = local.run(GenerationRequest("text2img", "A lighthouse at dusk", think=True, max_think_tokens=8, num_inference_steps=4, seed=3,
                                       height=32, width=32))
    assert parts[0] == {"type": "text", "text": want.think_text}
    assert np.array_equal(png_pixels(parts[1]["image_url"]["url"].split(",", 1)[1]), np.asarray(want.image))
    crossed += 1

    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    resp = post(app, "/v1/images/edits", files={"image": ("in.png", buf.getvalue(), "image/png")},
                data={"prompt": "Make the sky purple.", "num_inference_steps": "5", "seed": "11"})
    assert resp.status_code == 200, resp.text
    want = local.run(GenerationRequest("img2img", "Make the sky purple.", image=picture, seed=11, num_inference_steps=5))
    assert np.array_equal(png_pixels(resp.json()["data"][0]["b64_json"]), np.asarray(want.image))
    crossed += 1

    body = {"messages": [{"role": "user", "content": "Say something"}], "max_tokens": 10, "stream": True}
    with post(app, "/v1/chat/completions", json=body, stream=True) as resp:
        events = sse_events(resp)
    want = local.run(GenerationRequest("text2text", "Say something", max_tokens=10))
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == want.text

    body = {"messages": [{"role": "user", "content": "a boat"}], "modalities": ["image"], "num_inference_steps": 5,
            "size": "32x32", "stream": True, "seed": 1}
    with post(app, "/v1/chat/completions", json=body, stream=True) as resp:
        events = sse_events(resp)
    assert [e["progress"]["step"] for e in events[:-1] if "progress" in e] == [1, 2, 3, 4]
    url = events[-2]["choices"][0]["delta"]["content"][-1]["image_url"]["url"]
    want = local.run(GenerationRequest("text2img", "a boat", num_inference_steps=5, height=32, width=32, seed=1))
    assert np.array_equal(png_pixels(url.split(",", 1)[1]), np.asarray(want.image))
    crossed += 1

    want_counts = dict(before)
    want_counts[("object_store", "true")] = want_counts.get(("object_store", "true"), 0.0) + crossed
    assert wait_for_handoffs(app, app.dits, want_counts) == want_counts
