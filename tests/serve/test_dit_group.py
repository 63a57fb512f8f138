"""A DiT replica spanning 2 placement-group bundles on CPUs (CFG parallel over gloo): it
answers over HTTP with the one-process image (with TaylorSeer too), denoises concurrent
requests in one batch over its ranks, its config is checked
before and at start, and when its worker-rank actor is killed the replica turns unhealthy,
requests fail clearly (503 with Retry-After, never a hang), and Serve replaces the whole group."""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest
import requests
from pydantic import ValidationError

from bagel_ray.engine.request import GenerationRequest
from bagel_ray.serve.config import AppConfig
from tests.conftest import outlasting
from tests.serve.conftest import deploy_variant, replica_actor_names
from tests.serve.test_app import png_pixels, post

BODY = {"prompt": "a lighthouse", "size": "64x64", "num_inference_steps": 6, "seed": 7, "cfg_interval": [0.0, 1.0]}
REQ = GenerationRequest("text2img", "a lighthouse", seed=7, num_inference_steps=6, height=64, width=64, cfg_interval=(0.0, 1.0))


def test_parallel_settings_are_validated_and_give_one_bundle_per_rank():
    with pytest.raises(ValidationError, match="dit.parallel.cfg"):
        AppConfig.model_validate({"dit": {"parallel": {"cfg": 4}}})
    with pytest.raises(ValidationError, match="dit.parallel.sequence"):
        AppConfig.model_validate({"dit": {"parallel": {"sequence": 0}}})
    cfg = AppConfig.model_validate({"dit": {"parallel": {"cfg": 2, "sequence": 2},
                                            "ray_actor_options": {"num_cpus": 4, "num_gpus": 1, "resources": {"dit_node": 0.001}}}})
    options = cfg.dit.serve_options("DiT", 5, None)
    assert options["placement_group_bundles"] == [{"CPU": 4, "GPU": 1, "dit_node": 0.001}] * 4
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert "placement_group_bundles" not in AppConfig().dit.serve_options("DiT", 5, None)


def test_a_bad_sequence_degree_or_missing_bundles_fail_at_start_naming_the_key(ray_session, local):
    from bagel_ray.serve.dit_group import DiTGroup, engine_config
    from bagel_ray.serve.engines import rank_dit

    with pytest.raises(ValueError, match=r"dit.parallel.sequence=4 must divide .*4 query heads, 2 key/value"):
        engine_config(AppConfig.model_validate({"dit": {"parallel": {"sequence": 4}}}).dit.parallel, 4, 2)
    app = AppConfig.model_validate({"dit": {"parallel": {"cfg": 2}}})
    with pytest.raises(ValueError, match=r"dit.parallel: cfg 2 x sequence 1 = 2 ranks, but .* 0 bundle"):
        DiTGroup(local.dit, app, app.model_dump(mode="json"), rank_dit)  # here, outside any placement group


@pytest.fixture(scope="module")
def parallel_app(serve_app):
    from ray import serve

    app = deploy_variant(serve_app, "parallel", {"dit.parallel": {"cfg": 2}, "dit.parallel.timeout_s": 30})
    yield app
    serve.delete(app.name)


def generate(app) -> requests.Response:
    return requests.post(app.url + "/v1/images/generations", json=BODY, timeout=120)


def test_a_two_bundle_dit_replica_answers_over_http(parallel_app, local, picture):
    """text2img (contexts from the Thinker, cond and cfg_text on one rank each), the same with
    TaylorSeer (its forwards 5 and 6 predicted on each branch's rank), and img2img (contexts
    built on the DiT's rank 0, three branches dealt over the two ranks)."""
    resp = generate(parallel_app)
    assert resp.status_code == 200, resp.text
    want = np.asarray(local.run(REQ).image).astype(int)
    got = png_pixels(resp.json()["data"][0]["b64_json"]).astype(int)
    assert np.abs(got - want).max() <= 1  # the golden uint8 tolerance (rows split differently: ~1e-6 apart)
    resp = requests.post(parallel_app.url + "/v1/images/generations",
                         json={**BODY, "num_inference_steps": 8, "taylorseer": True}, timeout=120)
    assert resp.status_code == 200, resp.text
    cached = np.asarray(local.run(replace(REQ, num_inference_steps=8, taylorseer=True)).image).astype(int)
    exact = np.asarray(local.run(replace(REQ, num_inference_steps=8)).image).astype(int)
    assert np.abs(cached - exact).max() > 1  # so the cache's use shows in the image
    assert np.abs(png_pixels(resp.json()["data"][0]["b64_json"]).astype(int) - cached).max() <= 1
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    resp = post(parallel_app, "/v1/images/edits", files={"image": ("in.png", buf.getvalue(), "image/png")},
                data={"prompt": "Make it night.", "num_inference_steps": "5", "seed": "21"})
    assert resp.status_code == 200, resp.text
    want = np.asarray(local.run(GenerationRequest("img2img", "Make it night.", image=picture, seed=21, num_inference_steps=5)).image)
    assert np.abs(png_pixels(resp.json()["data"][0]["b64_json"]).astype(int) - want.astype(int)).max() <= 1
    from ray import serve

    dit = serve.get_deployment_handle("DiT", parallel_app.name)
    assert len(dit.group_workers.remote().result()) == 1


def test_concurrent_requests_are_denoised_in_one_batch_over_the_ranks(parallel_app, local):
    """Requests of one size that arrive while another denoises join its batch on both ranks
    (different steps, seeds and CFG; one of them leaves cancelled mid-way): the group runs
    fewer steps than the requests one after another would, and each answer is the
    one-process image."""
    from ray import serve
    from ray.serve.exceptions import RequestCancelledError

    dit = serve.get_deployment_handle("DiT", parallel_app.name)
    before = dit.group_steps.remote().result()
    bodies = [{**BODY, "num_inference_steps": 150, "seed": 1},
              {**BODY, "num_inference_steps": 12, "seed": 2, "cfg_text_scale": 2.5},
              {**BODY, "num_inference_steps": 9, "seed": 3, "cfg_interval": [0.4, 1.0]}]
    with ThreadPoolExecutor(len(bodies)) as pool:
        first = pool.submit(requests.post, parallel_app.url + "/v1/images/generations", json=bodies[0], timeout=300)
        while dit.group_steps.remote().result()["steps"] == before["steps"]:  # the long one is running
            assert not first.done(), first.result().text
            time.sleep(0.05)
        gone = parallel_app.handle.generate.remote(outlasting(replace(REQ, seed=4), 400))
        later = [pool.submit(requests.post, parallel_app.url + "/v1/images/generations", json=body, timeout=300)
                 for body in bodies[1:]]
        answers = [f.result() for f in later]
        gone.cancel()  # it leaves the batch, the long one goes on
        with pytest.raises(RequestCancelledError):
            gone.result(timeout_s=60)
        answers.insert(0, first.result())
    after = dit.group_steps.remote().result()
    alone = [replace(REQ, num_inference_steps=b["num_inference_steps"], seed=b["seed"],
                     cfg_text_scale=b.get("cfg_text_scale", REQ.cfg_text_scale), cfg_interval=tuple(b["cfg_interval"]))
             for b in bodies]
    for resp, req in zip(answers, alone):
        assert resp.status_code == 200, resp.text
        want = np.asarray(local.run(req).image).astype(int)
        assert np.abs(png_pixels(resp.json()["data"][0]["b64_json"]).astype(int) - want).max() <= 1, req
    assert after["most"] >= 3, after  # the long one, the two later ones (and the cancelled one) shared steps
    steps_alone = sum(req.num_inference_steps - 1 for req in alone)  # a schedule of n steps is n - 1 updates
    assert after["steps"] - before["steps"] < steps_alone, (before, after)


def test_the_worker_rank_fetches_its_own_share_from_the_object_store(parallel_app, local):
    """With a DiT replica of 2 ranks the Thinker stores the contexts by reference in pieces; the
    worker rank gets the pieces of its branches (cfg_text's prefix, its half of cond's heads)
    from the object store itself: fewer bytes than the handoff, none relayed by rank 0, and
    the image of the one-process path."""
    import ray
    from ray import serve

    dit = serve.get_deployment_handle("DiT", parallel_app.name)
    relayed = dit.group_relayed_bytes.remote().result()
    got = parallel_app.handle.generate.remote(REQ).result(timeout_s=120)
    (worker,) = dit.group_workers.remote().result()
    fetched = ray.get(worker.__ray_call__.remote(lambda w: w.last_fetch), timeout=30)
    assert fetched is not None and fetched.route == "object_store", fetched
    gen, prefix = (c := local.prepare_image(REQ).contexts).gen.kv, c.cfg_text.length
    row = gen[:, :, :1].numel() * gen.element_size()  # one row, every layer and KV head
    assert got.timings["handoff_bytes"] == gen.shape[2] * row
    # cfg_text's rows whole, then the worker's half of cond's heads (it helps cond)
    assert fetched.nbytes == prefix * row + (gen.shape[2] - prefix) * row // 2, (fetched, prefix, gen.shape)
    assert dit.group_relayed_bytes.remote().result() == relayed  # rank 0 sent the worker nothing
    want = np.asarray(local.run(REQ).image).astype(int)
    assert np.abs(np.asarray(got.image).astype(int) - want).max() <= 1


def test_a_cancelled_request_stops_every_rank_and_the_group_goes_on(parallel_app, local):
    """Cancelling a request in flight stops it on both ranks at its next step (rank 0 tells the
    worker through the step's gather): the group is free for the next request at once, and
    is not broken (the same replica answers)."""
    from ray.serve.exceptions import RequestCancelledError

    before = replica_actor_names(parallel_app.name, "DiT")
    long = parallel_app.handle.generate.remote(outlasting(GenerationRequest("text2img", "a long one", seed=3, height=64,
                                                                            width=64), 20000))
    time.sleep(2.0)
    long.cancel()
    with pytest.raises(RequestCancelledError):
        long.result(timeout_s=30)
    t0 = time.monotonic()
    resp = generate(parallel_app)  # queued behind the long one until it stops
    assert resp.status_code == 200, resp.text
    assert time.monotonic() - t0 < 60, "the cancelled request kept the group busy"
    want = np.asarray(local.run(REQ).image).astype(int)
    assert np.abs(png_pixels(resp.json()["data"][0]["b64_json"]).astype(int) - want).max() <= 1
    assert replica_actor_names(parallel_app.name, "DiT") == before


def test_the_replica_survives_the_kill_of_its_worker_rank(parallel_app, local):
    """The worker rank is killed while a long request runs on the group: that request ends
    with a 503 and Retry-After soon after (or had finished), the next ones fail the same way
    until Serve has replaced the replica, then they get the one-process image again."""
    import ray
    from ray import serve

    before = replica_actor_names(parallel_app.name, "DiT")
    (worker,) = serve.get_deployment_handle("DiT", parallel_app.name).group_workers.remote().result()
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(requests.post, parallel_app.url + "/v1/images/generations",
                           json={**BODY, "num_inference_steps": 400}, timeout=120)
        time.sleep(2.0)  # its steps are running on both ranks
        ray.kill(worker, no_restart=True)
        t0 = time.monotonic()
        in_flight = long.result()
    assert time.monotonic() - t0 < 60, "the request in flight hung"
    assert in_flight.status_code == 200 or (in_flight.status_code == 503 and "Retry-After" in in_flight.headers
                                            and "error" in in_flight.json()), in_flight.text
    deadline = time.monotonic() + 180
    answers = []
    while True:
        t0 = time.monotonic()
        resp = generate(parallel_app)
        assert time.monotonic() - t0 < 100, "a request hung"
        answers.append(resp.status_code)
        if resp.status_code == 200:
            break
        assert resp.status_code == 503 and "Retry-After" in resp.headers and "error" in resp.json(), resp.text  # retryable, not a hang
        assert time.monotonic() < deadline, f"not replaced: {answers}"
        time.sleep(1)
    after = replica_actor_names(parallel_app.name, "DiT")
    assert set(after).isdisjoint(before), (before, after)  # Serve replaced the group's replica
    want = np.asarray(local.run(REQ).image).astype(int)
    assert np.abs(png_pixels(resp.json()["data"][0]["b64_json"]).astype(int) - want).max() <= 1
