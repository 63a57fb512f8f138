"""img2img through the Thinker -> KV handoff -> DiT path (with the TaylorSeer step cache too, and
think mode), and autoscaling bounds read back from Serve."""

from __future__ import annotations

import io

import numpy as np
import torch

from bagel_ray.engine.request import GenerationRequest
from tests.serve.test_app import png_pixels, post


def test_img2img_through_the_thinker_matches_local(two_stage_app, local, picture):  # noqa: F811
    req = GenerationRequest("img2img", "Make it night.", image=picture, seed=21, num_inference_steps=5)
    got = two_stage_app.handle.generate.remote(req).result(timeout_s=120)
    want = local.run(req)
    assert torch.equal(got.latent_tokens, want.latent_tokens)
    assert got.timings["handoff_bytes"] > 0  # the contexts really crossed
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    resp = post(two_stage_app, "/v1/images/edits", files={"image": ("in.png", buf.getvalue(), "image/png")},
                data={"prompt": "Make it night.", "num_inference_steps": "5", "seed": "21"})
    assert resp.status_code == 200, resp.text
    assert np.array_equal(png_pixels(resp.json()["data"][0]["b64_json"]), np.asarray(want.image))


def test_autoscaling_bounds_read_back_from_serve(two_stage_app):
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    details = ServeInstanceDetails(**_get_global_client().get_serve_details())
    deployments = details.applications[two_stage_app.name].deployments
    for stage in ("thinker", "dit"):
        config = deployments["Thinker" if stage == "thinker" else "DiT"].deployment_config
        want = two_stage_app.args[stage]["autoscaling_config"]
        got = config.autoscaling_config
        got = got if isinstance(got, dict) else got.dict()
        assert (got["min_replicas"], got["max_replicas"]) == (want["min_replicas"], want["max_replicas"])
        assert config.max_ongoing_requests == two_stage_app.args[stage]["max_ongoing_requests"]
        assert config.ray_actor_options.num_cpus == two_stage_app.args[stage]["ray_actor_options"]["num_cpus"]


def test_think_and_edit_with_the_step_cache_through_the_handoff(two_stage_app, local, picture):  # noqa: F811
    """`taylorseer` with think mode (the plan decoded on the Thinker, its context handed off)
    and with img2img contexts built on the Thinker: each alone, the local result bit for bit;
    over the chat API, the same think text and pixels."""
    think = GenerationRequest("text2img", "A lighthouse at dusk", seed=3, num_inference_steps=10, height=32, width=32, think=True,
                              max_think_tokens=6, taylorseer=True)
    edit = GenerationRequest("img2img", "Make it night.", image=picture, seed=21, num_inference_steps=10, taylorseer=True)
    for req in (think, edit):
        got = two_stage_app.handle.generate.remote(req).result(timeout_s=120)
        want = local.run(req)
        assert torch.equal(got.latent_tokens, want.latent_tokens), req.modality
        assert got.think_text == want.think_text
        assert got.timings["handoff_bytes"] > 0
    body = {"messages": [{"role": "user", "content": think.prompt}], "modalities": ["image"], "think": True, "max_think_tokens": 6,
            "num_inference_steps": 10, "seed": 3, "size": "32x32", "taylorseer": True}
    resp = post(two_stage_app, "/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    parts = resp.json()["choices"][0]["message"]["content"]
    want = local.run(think)
    assert parts[0] == {"type": "text", "text": want.think_text}
    assert np.array_equal(png_pixels(parts[1]["image_url"]["url"].split(",", 1)[1]), np.asarray(want.image))
