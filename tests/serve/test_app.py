"""The tiny Serve app on a real local Ray cluster, over real HTTP and through handles.

Every modality must give the same output as `LocalPipeline` in this process for the same
seed: the KV handoff between replicas changes nothing.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from bagel_ray.client import Client
from bagel_ray.engine.request import GenerationRequest
from bagel_ray.serve.schemas import png_base64


def post(app, path: str, **kwargs) -> requests.Response:
    return requests.post(app.url + path, timeout=120, **kwargs)


def png_pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def data_url(image: Image.Image) -> str:
    return f"data:image/png;base64,{png_base64(image)}"


def test_every_replica_logs_into_its_serve_log_that_it_is_ready(serve_app):
    """Our INFO records reach the replicas' Serve log files (and `serve run`'s console)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    for stage, line in (("Thinker", "Thinker ready in"), ("DiT", "DiT ready in"), ("Driver", "Driver ready")):
        files = list(logs.glob(f"replica_{serve_app.name}_{stage}_*.log"))
        assert files, sorted(p.name for p in logs.iterdir())
        assert any(line in f.read_text() for f in files), (stage, [f.read_text()[-2000:] for f in files])


def test_health_and_models(serve_app):
    assert requests.get(serve_app.url + "/health", timeout=30).json() == {"status": "ok"}
    models = requests.get(serve_app.url + "/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["bagel"]


def test_stages_are_separate_deployments(serve_app):
    from ray import serve

    deployments = serve.status().applications[serve_app.name].deployments
    assert {"Driver", "Thinker", "DiT"} <= set(deployments)
    for name in ("Thinker", "DiT"):
        running = deployments[name].replica_states.get("RUNNING", 0)
        assert running == serve_app.args[name.lower()]["num_replicas"] == 1


def test_text2text_matches_local(serve_app, local):
    body = {"messages": [{"role": "user", "content": "Tell me a fun fact about the moon."}], "max_tokens": 12, "seed": 5}
    resp = post(serve_app, "/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    want = local.run(GenerationRequest("text2text", "Tell me a fun fact about the moon.", max_tokens=12, seed=5))
    choice = resp.json()["choices"][0]
    assert choice["message"]["content"] == want.text
    assert choice["finish_reason"] == want.finish_reason


def test_img2text_matches_local(serve_app, local, picture):
    content = [{"type": "text", "text": "What is in the picture?"}, {"type": "image_url", "image_url": {"url": data_url(picture)}}]
    resp = post(serve_app, "/v1/chat/completions", json={"messages": [{"role": "user", "content": content}], "max_tokens": 10})
    assert resp.status_code == 200, resp.text
    # the server decodes the PNG it was sent: compare against the same pixels
    want = local.run(GenerationRequest("img2text", "What is in the picture?", image=picture, max_tokens=10))
    assert resp.json()["choices"][0]["message"]["content"] == want.text


def test_text2img_matches_local(serve_app, local):
    body = {"prompt": "A red fox sleeps under an old oak tree.", "size": "64x48", "num_inference_steps": 6, "seed": 7,
            "cfg_img_scale": 1.5}
    resp = post(serve_app, "/v1/images/generations", json=body)
    assert resp.status_code == 200, resp.text
    item = resp.json()["data"][0]
    want = local.run(GenerationRequest("text2img", body["prompt"], seed=7, num_inference_steps=6, height=48, width=64, cfg_img_scale=1.5))
    assert item["seed"] == 7
    assert np.array_equal(png_pixels(item["b64_json"]), np.asarray(want.image))


def test_handoff_keeps_latents_bit_identical(serve_app, local):
    """Through the handle the result carries the final latents: equal to the local ones."""
    import torch

    for req in (
        GenerationRequest("text2img", "a castle", seed=1, num_inference_steps=5, height=64, width=64, cfg_img_scale=1.5),
        GenerationRequest("text2img", "a castle", seed=2, num_inference_steps=4, height=32, width=48, think=True, max_think_tokens=6),
    ):
        got = serve_app.handle.generate.remote(req).result(timeout_s=120)
        assert torch.equal(got.latent_tokens, local.run(req).latent_tokens)
        assert got.timings["handoff_bytes"] > 0


def test_img2img_matches_local(serve_app, local, picture):
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    resp = post(serve_app, "/v1/images/edits", files={"image": ("in.png", buf.getvalue(), "image/png")},
                data={"prompt": "Make the sky purple.", "num_inference_steps": "5", "seed": "11"})
    assert resp.status_code == 200, resp.text
    want = local.run(GenerationRequest("img2img", "Make the sky purple.", image=picture, seed=11, num_inference_steps=5))
    assert np.array_equal(png_pixels(resp.json()["data"][0]["b64_json"]), np.asarray(want.image))


def test_think_text2img_matches_local(serve_app, local):
    body = {"messages": [{"role": "user", "content": "A lighthouse at dusk"}], "modalities": ["image"], "think": True,
            "max_think_tokens": 8, "num_inference_steps": 4, "seed": 3, "size": "32x32"}
    resp = post(serve_app, "/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    parts = resp.json()["choices"][0]["message"]["content"]
    want = local.run(GenerationRequest("text2img", "A lighthouse at dusk", think=True, max_think_tokens=8, num_inference_steps=4, seed=3,
                                       height=32, width=32))
    assert parts[0] == {"type": "text", "text": want.think_text}
    url = parts[1]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert np.array_equal(png_pixels(url.split(",", 1)[1]), np.asarray(want.image))


def sse_events(resp: requests.Response) -> list:
    events = []
    for line in resp.iter_lines():
        if line.startswith(b"data: "):
            data = line[len(b"data: "):]
            events.append(data.decode() if data == b"[DONE]" else json.loads(data))
    return events


def test_streaming_text(serve_app, local):
    body = {"messages": [{"role": "user", "content": "Say something"}], "max_tokens": 10, "stream": True}
    with post(serve_app, "/v1/chat/completions", json=body, stream=True) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"].get("content", "") for e in events[:-1]]
    want = local.run(GenerationRequest("text2text", "Say something", max_tokens=10))
    assert "".join(deltas) == want.text
    assert sum(1 for d in deltas if d) > 1  # really streamed, not one final blob
    assert events[-2]["choices"][0]["finish_reason"] == want.finish_reason


def test_streaming_image_progress(serve_app):
    body = {"messages": [{"role": "user", "content": "a boat"}], "modalities": ["image"], "num_inference_steps": 5,
            "size": "32x32", "stream": True, "seed": 1}
    with post(serve_app, "/v1/chat/completions", json=body, stream=True) as resp:
        events = sse_events(resp)
    progress = [e["progress"] for e in events[:-1] if "progress" in e]
    assert [p["step"] for p in progress] == [1, 2, 3, 4]
    assert all(p["total"] == 4 for p in progress)
    final = events[-2]["choices"][0]
    assert final["finish_reason"] == "stop"
    assert final["delta"]["content"][-1]["type"] == "image_url"


def test_client_over_handle_and_http(serve_app, local, picture):
    from ray import serve

    over_handle = Client(handle=serve.get_app_handle(serve_app.name))
    over_http = Client(url=serve_app.url)
    text_h = over_handle.chat("Hello there", max_tokens=6, seed=2)
    text_u = over_http.chat("Hello there", max_tokens=6, seed=2)
    assert text_h == text_u == local.run(GenerationRequest("text2text", "Hello there", max_tokens=6, seed=2)).text
    img_h = over_handle.generate_image("a cat", size="32x32", num_inference_steps=3, seed=4)
    img_u = over_http.generate_image("a cat", size="32x32", num_inference_steps=3, seed=4)
    assert img_h.size == img_u.size == (32, 32) and img_h.info["seed"] == img_u.info["seed"] == 4
    assert np.array_equal(np.asarray(img_h), np.asarray(img_u.convert("RGB")))
    edit_h = over_handle.edit_image(picture, "make it blue", num_inference_steps=3, seed=6)
    edit_u = over_http.edit_image(picture, "make it blue", num_inference_steps=3, seed=6)
    assert np.array_equal(np.asarray(edit_h), np.asarray(edit_u.convert("RGB")))
    assert over_http.chat("What is this?", image=picture, max_tokens=4) == over_handle.chat("What is this?", image=picture, max_tokens=4)


@pytest.mark.parametrize(
    "path,body,status,param",
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "bogus": 1}, 422, "bogus"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 422, "max_tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "cfg_interval": [0.9, 0.1]}, 422, "cfg_interval"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.invalid/a.png"}}]}]}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "other"}, 404, "model"),
        ("/v1/images/generations", {"prompt": "x", "size": "100x64"}, 422, "size"),
        ("/v1/images/generations", {"prompt": "x", "size": "4096x4096"}, 400, "size"),  # past the model's largest side
        ("/v1/images/generations", {"prompt": "x", "num_inference_steps": 0}, 422, "num_inference_steps"),
        ("/v1/images/generations", {"prompt": "x", "cfg_renorm_type": "local"}, 422, "cfg_renorm_type"),
        ("/v1/images/generations", {"prompt": ""}, 422, "prompt"),
        ("/v1/images/generations", {"prompt": "x", "response_format": "url"}, 422, "response_format"),
    ],
)
def test_bad_input_gets_a_clear_4xx(serve_app, path, body, status, param):
    resp = post(serve_app, path, json=body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["message"]


def test_bad_uploads(serve_app):
    resp = post(serve_app, "/v1/images/edits", files={"image": ("x.png", b"not an image", "image/png")}, data={"prompt": "x"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "image"
    resp = post(serve_app, "/v1/images/edits", data={"prompt": "x"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "image"
    resp = post(serve_app, "/v1/chat/completions", data=b"{not json", headers={"content-type": "application/json"})
    assert resp.status_code == 400
    # the service still answers after the bad ones
    ok = post(serve_app, "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok.status_code == 200
