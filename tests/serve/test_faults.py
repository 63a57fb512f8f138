"""Replica failures: a DiT replica, then a Thinker replica, is killed with `ray.kill` while
requests are in flight. Every request either succeeds, with the output an undisturbed run
gives (generation is seeded, so the driver's retry gives it too), or gets a clear 5xx JSON
error; Serve replaces the replica and the app is healthy again.

The output: the same text; images within `PIXEL_TOL` of the reference's (tests/determinism.py):
concurrent requests are denoised in batches, a retry in another batch than its first try, and
batched products may round otherwise than the reference's alone (an AVX-512 Xeon's do).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from bagel_ray.engine.request import GenerationRequest
from tests.determinism import assert_pixels_close
from tests.serve.conftest import deploy_variant, replica_actor_names
from tests.serve.test_app import png_pixels

REPLICAS = 2
CLIENTS = 6
# CFG at every step: two blocks a step, the case where this machine's CPU gives batched rows
# bit for bit (not all do: see the module docstring)
EVERY_STEP = [0.0, 1.0]


@pytest.fixture(scope="module")
def faulty(serve_app):
    from ray import serve

    app = deploy_variant(serve_app, "faulty", {"thinker.num_replicas": REPLICAS, "dit.num_replicas": REPLICAS})
    for make in (image_request, text_request):  # warm up: the kills below must land on busy replicas
        path, body, _ = make(0)
        assert requests.post(app.url + path, json=body, timeout=120).status_code == 200
    yield app
    serve.delete(app.name)


def image_request(i: int) -> tuple[str, dict, GenerationRequest]:
    body = {"prompt": f"picture {i}", "size": "128x128", "num_inference_steps": 100, "seed": 100 + i, "cfg_interval": EVERY_STEP}
    return "/v1/images/generations", body, GenerationRequest("text2img", body["prompt"], seed=100 + i, num_inference_steps=100, height=128,
                                                             width=128, cfg_interval=tuple(EVERY_STEP))


def text_request(i: int) -> tuple[str, dict, GenerationRequest]:
    body = {"messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 300, "seed": i}
    return "/v1/chat/completions", body, GenerationRequest("text2text", f"question {i}", max_tokens=300, seed=i)


def mixed_request(i: int) -> tuple[str, dict, GenerationRequest]:
    return text_request(i) if i % 2 else image_request(i)


def thinker_heavy_request(i: int) -> tuple[str, dict, GenerationRequest]:
    """Long text answers, and images with a long think text (decoded on the Thinker)."""
    if i % 2:
        body = {"messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 900, "seed": i}
        return "/v1/chat/completions", body, GenerationRequest("text2text", f"question {i}", max_tokens=900, seed=i)
    body = {"messages": [{"role": "user", "content": f"picture {i}"}], "modalities": ["image"], "think": True,
            "max_think_tokens": 400, "num_inference_steps": 10, "size": "64x64", "seed": i, "cfg_interval": EVERY_STEP}
    return "/v1/chat/completions", body, GenerationRequest("text2img", f"picture {i}", think=True, max_think_tokens=400,
                                                           num_inference_steps=10, height=64, width=64, seed=i, cfg_interval=tuple(EVERY_STEP))


def driver_retries() -> int:
    """How many retries after a replica death the drivers have logged so far."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())  # noqa: SLF001
    return sum(p.read_text(errors="replace").count("retrying once") for p in logs.glob("worker-*.err"))


def wait_until_replaced(app: str, deployment: str, killed: str, timeout_s: float = 90) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications[app]
        dep = status.deployments[deployment]
        names = replica_actor_names(app, deployment)
        if (status.status.value == "RUNNING" and dep.status.value == "HEALTHY" and killed not in names
                and len(names) == REPLICAS and dep.replica_states.get("RUNNING", 0) == REPLICAS):
            return
        assert time.monotonic() < deadline, f"{deployment} not healthy again: {dep}, {names}"
        time.sleep(0.5)


def run_with_a_kill(app, deployment: str, make) -> list[tuple[GenerationRequest, requests.Response]]:
    """CLIENTS clients send two requests each; one replica of `deployment` is killed as soon as
    the first answer is in (the other requests are then in flight on both replicas). Returns
    once Serve has replaced it."""
    import ray

    victim = replica_actor_names(app.name, deployment)[0]
    first_answer = threading.Event()

    def client(c: int) -> list[tuple[GenerationRequest, requests.Response]]:
        out = []
        for k in range(2):
            path, body, req = make(c * 2 + k)
            out.append((req, requests.post(app.url + path, json=body, timeout=120)))
            first_answer.set()
        return out

    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(client, c) for c in range(CLIENTS)]
        assert first_answer.wait(timeout=120)
        # The first answer comes when a replica's batch of first requests ends together (continuous
        # batching finishes equal-length decodes in one chunk); a moment later the second round is
        # on the replicas and decoding (~0.7 s for 900 tokens here), so the kill hits work in flight.
        time.sleep(0.2)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        results = [pair for f in futures for pair in f.result()]
    wait_until_replaced(app.name, deployment, victim)
    return results


def assert_same_output(body: dict, req: GenerationRequest, local) -> None:  # noqa: F811
    want = local.run(req)
    if "data" in body:  # /v1/images/generations
        assert body["data"][0]["seed"] == req.seed
        assert_pixels_close(png_pixels(body["data"][0]["b64_json"]), want.image, req.prompt)
        return
    content = body["choices"][0]["message"]["content"]
    if isinstance(content, str):
        assert content == want.text, req.prompt
        return
    assert content[0]["text"] == want.think_text, req.prompt
    assert_pixels_close(png_pixels(content[-1]["image_url"]["url"].split(",", 1)[1]), want.image, req.prompt)


def check(results, local) -> None:  # noqa: F811
    assert len(results) == CLIENTS * 2  # one answer per request, none lost
    for req, resp in results:
        if resp.status_code == 200:
            assert_same_output(resp.json(), req, local)
        else:  # a clear error, never a hang or a wrong answer
            assert resp.status_code >= 500, resp.text
            error = resp.json()["error"]
            assert error["type"] == "server_error" and error["message"]


@pytest.mark.parametrize("deployment,make", [("DiT", image_request), ("Thinker", thinker_heavy_request)])
def test_killing_a_replica_mid_request(faulty, local, deployment, make):  # noqa: F811
    retries = driver_retries()
    check(run_with_a_kill(faulty, deployment, make), local)
    assert driver_retries() > retries, "the kill should have hit requests in flight"
    for i in (97, 98):  # the app serves normally again
        path, body, req = mixed_request(i)
        resp = requests.post(faulty.url + path, json=body, timeout=120)
        assert resp.status_code == 200, resp.text
        assert_same_output(resp.json(), req, local)


def test_bulk_job_through_the_app_survives_replica_kills(faulty, local, tmp_path, capsys):  # noqa: F811
    """`python -m bagel_ray.jobs.bulk --app`: a DiT and a Thinker replica die mid-job. The job
    ends with every item recorded exactly once, each equal to an undisturbed run (a job that
    broke off instead is rerun, and resumes)."""
    import ray

    from bagel_ray.jobs.bulk import main
    from tests.jobs.reference import pixels, read_records, write_jsonl

    items, want = [], {}
    for i in range(18):
        if i % 3:
            item = {"id": f"img-{i:02d}", "modality": "text2img", "prompt": f"picture {i}", "height": 128, "width": 128,
                    "steps": 80, "seed": i, "cfg_interval": EVERY_STEP}
            want[item["id"]] = GenerationRequest("text2img", item["prompt"], height=128, width=128, num_inference_steps=80, seed=i,
                                                 cfg_interval=tuple(EVERY_STEP))
        else:
            item = {"id": f"txt-{i:02d}", "modality": "text2text", "prompt": f"question {i}", "max_tokens": 400, "seed": i}
            want[item["id"]] = GenerationRequest("text2text", item["prompt"], max_tokens=400, seed=i)
        items.append(item)
    inputs, out = write_jsonl(tmp_path / "input.jsonl", items), tmp_path / "out"
    args = ["--app", faulty.name, "--input", str(inputs), "--output", str(out), "--max-in-flight", "6"]
    victims = {d: replica_actor_names(faulty.name, d)[0] for d in ("DiT", "Thinker")}
    retries = driver_retries()

    codes: list[int] = []
    job = threading.Thread(target=lambda: codes.append(main(args)))
    job.start()
    deadline = time.monotonic() + 120
    while not (out / "results.jsonl").exists() or not read_records(out):
        assert time.monotonic() < deadline and job.is_alive(), "the job did not start"
        time.sleep(0.05)
    for name in victims.values():
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    job.join(timeout=300)
    assert codes and codes[0] in (0, 1), codes
    if codes[0] == 1:  # broke off (a replica died twice under one item): a rerun resumes
        assert main(args) == 0
    for deployment, name in victims.items():
        wait_until_replaced(faulty.name, deployment, name)
    assert driver_retries() > retries, "the kills should have hit requests in flight"

    records = read_records(out)
    assert sorted(r["id"] for r in records) == sorted(want)  # every item, exactly once
    for record in records:
        req = want[record["id"]]
        assert record["status"] == "ok", record
        expected = local.run(req)
        if req.outputs_image:
            assert_pixels_close(pixels(out / record["output"]), expected.image, record["id"])
        else:
            assert (out / record["output"]).read_text(encoding="utf-8") == expected.text, record["id"]


def test_a_stream_cut_by_a_replica_death_says_streams_are_not_retried(serve_app):
    """Streams are not retried, and their error event says so (not "again on its retry")."""
    import json

    import ray
    from ray import serve

    app = deploy_variant(serve_app, "streamcut", {})
    try:
        body = {"messages": [{"role": "user", "content": "talk"}], "max_tokens": 4000, "stream": True, "seed": 1}
        events = []
        with requests.post(app.url + "/v1/chat/completions", json=body, stream=True, timeout=120) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            for line in lines:
                if line.startswith(b"data: ") and b"content" in line:
                    break
            victim = replica_actor_names(app.name, "Thinker")[0]
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            for line in lines:
                if line.startswith(b"data: ") and line != b"data: [DONE]":
                    events.append(json.loads(line[6:]))
        errors = [e["error"] for e in events if "error" in e]
        assert len(errors) == 1 and errors[0]["code"] == 503, events[-3:]
        assert "not retried" in errors[0]["message"] and "again on its retry" not in errors[0]["message"], errors
    finally:
        serve.delete(app.name)
