"""TaylorSeer (`taylorseer`, issue 20) through the Serve app: the official cases over HTTP and
through the handle, from the seed (injected noise cannot cross HTTP), and a cached request
denoised beside an exact one, each getting what it gets alone.

How equal (tests/determinism.py): the official cases within the manifest's tolerances; the
batched pair within `TOL` / `PIXEL_TOL` of each request alone, since a batch sums its products
over more rows (the cached request's full forwards run with the exact one's rows)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from bagel_ray.engine.request import GenerationRequest
from tests.determinism import TOL, assert_pixels_close
from tests.engine.test_golden_pipeline import image_request
from tests.golden import assert_matches
from tests.serve.conftest import deploy_variant
from tests.serve.test_app import png_pixels, post

CASES = ("text2img_taylorseer", "img2img_taylorseer")


@pytest.fixture(scope="module")
def golden_app(serve_app, golden_model_dir):
    """The tiny app's settings on the golden checkpoint, at /golden, for this module."""
    from ray import serve

    app = deploy_variant(serve_app, "golden", {"model": str(golden_model_dir)})
    yield app
    serve.delete(app.name)


def http_knobs(case: dict) -> dict:
    """The case's request as HTTP knobs (the seed gives the noise, as the official code's)."""
    hyper = case["hyper"]
    return {"prompt": case["prompt"], "num_inference_steps": case["num_timesteps"], "seed": case["seed"],
            "cfg_text_scale": hyper["cfg_text_scale"], "cfg_img_scale": hyper["cfg_img_scale"],
            "cfg_interval": list(hyper["cfg_interval"]), "cfg_renorm_type": hyper["cfg_renorm_type"],
            "cfg_renorm_min": hyper["cfg_renorm_min"], "timestep_shift": hyper["timestep_shift"],
            "taylorseer": hyper["enable_taylorseer"]}


@pytest.mark.parametrize("name", CASES)
def test_official_case_over_http_and_the_handle(golden_app, golden_dir, manifest, name):
    case = manifest["cases"][name]
    knobs = http_knobs(case)
    if case["kind"] == "img2img":
        form = {k: ",".join(map(str, v)) if isinstance(v, list) else str(v).lower() if isinstance(v, bool) else str(v)
                for k, v in knobs.items()}
        png = (golden_dir / case["input_image"]).read_bytes()
        resp = post(golden_app, "/v1/images/edits", files={"image": ("in.png", png, "image/png")}, data=form)
    else:
        height, width = case["image_shape"]
        resp = post(golden_app, "/v1/images/generations", json={**knobs, "size": f"{width}x{height}"})
    assert resp.status_code == 200, resp.text
    item = resp.json()["data"][0]
    assert item["seed"] == case["seed"]
    with Image.open(golden_dir / case["png"]) as want:
        expected = torch.tensor(np.asarray(want.convert("RGB")))
    spec = case["tensors"]
    assert_matches(f"{name}.png over HTTP", torch.tensor(png_pixels(item["b64_json"])), expected, spec["image_uint8"]["compare"])

    from safetensors.torch import load_file

    want_latents = load_file(str(golden_dir / case["file"]))["final_latent_packed"]
    got = golden_app.handle.generate.remote(image_request(case, golden_dir, None)).result(timeout_s=120)
    assert_matches(f"{name} latents", got.latent_tokens, want_latents, spec["final_latent_packed"]["compare"])


def test_a_cached_and_an_exact_request_together_each_get_what_they_get_alone(serve_app, local):
    """One prompt and seed, one request with the step cache and one without, sent at once: the
    DiT replica steps them together (the cached one's Taylor forwards skip the network), and
    each result is its own alone, not the other's."""
    exact = GenerationRequest("text2img", "a lighthouse on a cliff", seed=31, num_inference_steps=14, height=64, width=64,
                              cfg_interval=(0.0, 1.0), cfg_img_scale=1.5)
    cached = replace(exact, taylorseer=True)
    want = [local.run(r) for r in (exact, cached)]
    assert not torch.allclose(want[0].latent_tokens, want[1].latent_tokens, **TOL)  # the knob changes the result
    calls = [serve_app.handle.generate.remote(r) for r in (exact, cached)]
    got = [c.result(timeout_s=120) for c in calls]
    assert max(g.timings["denoise_batch"] for g in got) > 1, [g.timings for g in got]
    for g, w in zip(got, want):
        torch.testing.assert_close(g.latent_tokens, w.latent_tokens, **TOL)
        assert_pixels_close(g.image, w.image, g.prompt)

