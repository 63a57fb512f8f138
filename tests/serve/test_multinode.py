"""The tiny app across a real multi-node Ray cluster on one machine:
each stage on its own node type, every modality over HTTP equal to one node's output (bit for
bit, as tests/serve/test_app.py compares; the cluster: benchmarks/multinode.py), and the KV handoff crossing nodes through the
object store, as the DiT's `bagel_kv_handoffs_total` counter records it per request."""

from __future__ import annotations

import inspect
import itertools
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from bagel_ray.engine.request import GenerationRequest
from benchmarks import multinode
from tests.serve import test_app as one_node
from tests.serve.test_app import png_pixels, post

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


# The single-node app's HTTP checks, each comparing with LocalPipeline as it does there; the
# number of KV handoffs each makes (text2img, think, img2img with edit contexts on the Thinker,
# an image stream).
ONE_NODE_CHECKS = [
    (one_node.test_text2text_matches_local, 0),
    (one_node.test_img2text_matches_local, 0),
    (one_node.test_text2img_matches_local, 1),
    (one_node.test_think_text2img_matches_local, 1),
    (one_node.test_img2img_matches_local, 1),
    (one_node.test_streaming_text, 0),
    (one_node.test_streaming_image_progress, 1),
]


def test_every_modality_over_http_matches_one_node(cluster_app, local, picture):
    """Each request's output equals LocalPipeline's (what the single-node app gives too), and
    each image request with a handoff took the object store across nodes."""
    app = cluster_app
    assert app.args["edit_contexts_on"] == "thinker"
    before = handoffs(app, app.dits)
    fixtures = {"serve_app": app, "local": local, "picture": picture}
    for check, _ in ONE_NODE_CHECKS:
        check(**{name: fixtures[name] for name in inspect.signature(check).parameters})
    want = dict(before)
    want[("object_store", "true")] = want.get(("object_store", "true"), 0.0) + sum(n for _, n in ONE_NODE_CHECKS)
    assert wait_for_handoffs(app, app.dits, want) == want


# -- losing a node --------------------------------------------------------------------------
# Image requests use CFG at every step: concurrent images are denoised in batches, and then
# batched equals alone bit for bit on the CPU (tests/engine/test_dit_batch.py).
EVERY_STEP = [0.0, 1.0]
CLIENTS = 4
STEPS = 40


def image_request(i: int, steps: int = STEPS) -> tuple[str, dict, GenerationRequest]:
    body = {"prompt": f"picture {i}", "size": "64x64", "num_inference_steps": steps, "seed": 100 + i, "cfg_interval": EVERY_STEP}
    return "/v1/images/generations", body, GenerationRequest("text2img", body["prompt"], seed=100 + i, num_inference_steps=steps,
                                                             height=64, width=64, cfg_interval=tuple(EVERY_STEP))


def long_image_request(i: int) -> tuple[str, dict, GenerationRequest]:
    """Denoising for seconds (10-30 ms a step here, in a batch of four)."""
    return image_request(i, 5 * STEPS)


def steps_run(app, node) -> float:
    return sum(app.metric(node, "ray_bagel_denoise_steps_total").values())


def driver_retries(app) -> int:
    """Retries after a replica death that the driver (on the head) has logged so far."""
    logs = Path(app.head.get_logs_dir_path())
    return sum(p.read_text(errors="replace").count("retrying once") for p in logs.glob("serve/replica_*_Driver_*.log"))


def bulk_items(folder: Path) -> tuple[Path, dict[str, GenerationRequest]]:
    from tests.jobs.reference import write_jsonl

    items, want = [], {}
    for i in range(10):
        if i % 3:
            item = {"id": f"img-{i:02d}", "modality": "text2img", "prompt": f"bulk {i}", "height": 64, "width": 64,
                    "steps": STEPS, "seed": i, "cfg_interval": EVERY_STEP}
            want[item["id"]] = GenerationRequest("text2img", item["prompt"], height=64, width=64, num_inference_steps=STEPS, seed=i,
                                                 cfg_interval=tuple(EVERY_STEP))
        else:
            item = {"id": f"txt-{i:02d}", "modality": "text2text", "prompt": f"question {i}", "max_tokens": 200, "seed": i}
            want[item["id"]] = GenerationRequest("text2text", item["prompt"], max_tokens=200, seed=i)
        items.append(item)
    return write_jsonl(folder / "input.jsonl", items), want


def bulk_job(app, inputs: Path, out: Path, *extra: str) -> subprocess.Popen:
    """`python -m bagel_ray.jobs.bulk --app` as its own driver process on the head."""
    cmd = [sys.executable, "-m", "bagel_ray.jobs.bulk", "--app", app.name, "--ray-address", app.cluster.address,
           "--input", str(inputs), "--output", str(out), "--max-in-flight", "4", "--progress-interval", "5", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def check_answers(results, local, deadline_s: float) -> tuple[int, int]:
    """Each answer is the undisturbed output or a clear 5xx, and none took past the deadline.
    Returns (ok, failed)."""
    ok = failed = 0
    for req, status, body, took in results:
        assert took < deadline_s + 15, f"{req.prompt}: {took:.0f}s, past the deadline of {deadline_s}s"
        if status == 200:
            assert np.array_equal(png_pixels(body["data"][0]["b64_json"]), np.asarray(local.run(req).image)), req.prompt
            ok += 1
        else:
            assert status >= 500 and body["error"]["type"] == "server_error" and body["error"]["message"], body
            failed += 1
    return ok, failed


def send(app, make, indices) -> list:
    def one(i):
        path, body, req = make(i)
        t0 = time.monotonic()
        resp = requests.post(app.url + path, json=body, timeout=300)
        return req, resp.status_code, resp.json(), time.monotonic() - t0

    with ThreadPoolExecutor(len(indices)) as pool:
        return list(pool.map(one, indices))


def report(**figures) -> None:
    """The measured figures, for README "What the service promises" (run with -s to see them)."""
    print("\nmultinode figures:", json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in figures.items()}))


@pytest.mark.slow
def test_losing_a_dit_node_under_load(cluster_app, local, tmp_path):
    """A DiT node's raylet and workers are killed while HTTP clients and a bulk job have
    requests on it. Clients get their images (retried on the other DiT node) or a clear 5xx
    within the deadline; the lost replica waits for capacity (one DiT a node), is placed on a
    node that joins, and that node takes requests; the bulk job records every item once."""
    from tests.jobs.reference import pixels, read_records

    app = cluster_app
    deadline_s = app.args["request_timeout_s"]
    inputs, want = bulk_items(tmp_path)
    out = tmp_path / "out"
    job = bulk_job(app, inputs, out)
    retries = driver_retries(app)
    victim, survivor = app.dits
    answers: list = []
    started = time.monotonic()
    with ThreadPoolExecutor(2 * CLIENTS) as pool:
        first_round = [pool.submit(send, app, image_request, [c]) for c in range(CLIENTS)]
        deadline = time.monotonic() + 120
        while not (out / "results.jsonl").exists() or not read_records(out):  # the job is under way
            assert time.monotonic() < deadline and job.poll() is None, job.stdout.read() if job.poll() is not None else "no record"
            time.sleep(0.2)
        # Clients then send long images back to back until the kill, so the victim is denoising
        # one when it dies whatever this machine's speed (a fixed round can end before the
        # metric below, exported every few seconds, shows the victim busy).
        steps = steps_run(app, victim)
        killing, numbers = threading.Event(), itertools.count(CLIENTS)
        lock = threading.Lock()

        def until_the_kill() -> list:
            out = []
            while not killing.is_set():
                with lock:
                    i = next(numbers)
                out += send(app, long_image_request, [i])
            return out

        second_round = [pool.submit(until_the_kill) for _ in range(CLIENTS)]
        deadline = time.monotonic() + 60
        while steps_run(app, victim) < steps + 20:  # the victim takes this round's requests
            assert time.monotonic() < deadline, "the DiT node to kill got no work"
            time.sleep(0.2)
        # Kill while its replica is denoising now (a fifth of a core or more): the metric above
        # was exported up to a second ago, when the request it counted may have been ending.
        deadline = time.monotonic() + 30
        while True:
            before = app.cpu_seconds(victim)
            time.sleep(0.25)
            if app.cpu_seconds(victim) - before >= 0.05:
                break
            assert time.monotonic() < deadline, "the DiT node to kill was never busy"
        killing.set()
        killed = app.kill(victim)
        for f in (*first_round, *second_round):
            answers += f.result()
    ok, failed = check_answers(answers, local, deadline_s)
    retried = driver_retries(app) - retries
    print("answers:", [(status, round(took, 1)) for _, status, _, took in answers], "kill at", round(killed - started, 1))
    assert retried > 0, "the kill should have hit requests in flight"

    # the lost replica is gone from Serve's view; its replacement waits for a DiT node
    app.wait_for("DiT", [survivor])
    detected_s = time.monotonic() - killed
    joined = time.monotonic()
    newcomer = app.add_node("dit_node")
    app.wait_for("DiT", [survivor, newcomer])
    replaced_s = time.monotonic() - joined

    # the newcomer takes load
    before = handoffs(app, [newcomer]).get(("object_store", "true"), 0.0)
    after_answers = send(app, image_request, list(range(20, 20 + CLIENTS)))
    assert check_answers(after_answers, local, deadline_s) == (CLIENTS, 0)
    deadline = time.monotonic() + 30
    while handoffs(app, [newcomer]).get(("object_store", "true"), 0.0) <= before:
        assert time.monotonic() < deadline, "the new DiT node took none of the requests"
        time.sleep(1)

    output, _ = job.communicate(timeout=300)
    assert job.returncode in (0, 1), output
    records = read_records(out)
    if job.returncode == 1 or any(r["status"] != "ok" for r in records):  # broke off or failed items: a rerun resumes
        rerun = bulk_job(app, inputs, out, "--retry-failed")
        output, _ = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, output
        records = read_records(out)
    assert sorted(r["id"] for r in records) == sorted(want)  # every item, exactly once
    for record in records:
        req = want[record["id"]]
        assert record["status"] == "ok", record
        if req.outputs_image:
            assert np.array_equal(pixels(out / record["output"]), np.asarray(local.run(req).image)), record["id"]
        else:
            assert (out / record["output"]).read_text(encoding="utf-8") == local.run(req).text, record["id"]
    report(dit_node_lost_requests=len(answers), ok=ok, failed_5xx=failed, driver_retries=retried,
           bulk_job_reruns=int(job.returncode == 1), lost_replica_gone_s=detected_s, replica_on_new_node_s=replaced_s)


@pytest.mark.slow
def test_losing_the_thinker_node(cluster_app, local):
    """The Thinker's node is killed while image requests are denoising on the DiT nodes: those,
    whose contexts the DiT already holds, finish with the undisturbed output; a text request
    fails with a clear 5xx by the deadline; once a thinker node joins, text is served again."""
    app = cluster_app
    deadline_s = app.args["request_timeout_s"]
    streams, progressed = [], threading.Barrier(CLIENTS + 1, timeout=120)

    def stream(i: int):
        _, body, req = image_request(i)
        chat = {"messages": [{"role": "user", "content": body["prompt"]}], "modalities": ["image"], "stream": True,
                **{k: body[k] for k in ("size", "num_inference_steps", "seed", "cfg_interval")}}
        t0 = time.monotonic()
        events, waited = [], False
        with requests.post(app.url + "/v1/chat/completions", json=chat, stream=True, timeout=300) as resp:
            for line in resp.iter_lines():
                if line.startswith(b"data: ") and line != b"data: [DONE]":
                    events.append(json.loads(line[6:]))
                    if "progress" in events[-1] and not waited:  # the DiT has this request's contexts
                        waited = True
                        progressed.wait()
        return req, events, time.monotonic() - t0

    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(stream, 40 + c) for c in range(CLIENTS)]  # with STEPS steps: denoising for seconds
        progressed.wait()
        killed = app.kill(app.thinker)
        # The replica's process outlives its raylet for a moment and may still answer: "until
        # it returns" starts once Serve has seen the replica go.
        app.wait_for("Thinker", [])
        t0 = time.monotonic()
        text = requests.post(app.url + "/v1/chat/completions", timeout=300,
                             json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        text_failed_s = time.monotonic() - t0
        streams = [f.result() for f in futures]
    for req, events, took in streams:
        assert took < deadline_s + 15
        url = events[-1]["choices"][0]["delta"]["content"][-1]["image_url"]["url"]
        assert np.array_equal(png_pixels(url.split(",", 1)[1]), np.asarray(local.run(req).image)), req.prompt
    assert text.status_code >= 500 and text.json()["error"]["type"] == "server_error", text.text
    assert text_failed_s < deadline_s + 15

    joined = time.monotonic()
    app.add_node("thinker_node")
    app.wait_for("Thinker", [app.thinker])
    body = {"messages": [{"role": "user", "content": "Tell me a fun fact about the moon."}], "max_tokens": 12, "seed": 5}
    resp = post(app, "/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    want = local.run(GenerationRequest("text2text", "Tell me a fun fact about the moon.", max_tokens=12, seed=5))
    assert resp.json()["choices"][0]["message"]["content"] == want.text
    report(thinker_node_lost_streams_finished=len(streams), text_status_while_gone=text.status_code,
           text_failed_after_s=text_failed_s, thinker_back_after_join_s=time.monotonic() - joined,
           since_kill_s=time.monotonic() - killed)


def test_a_node_that_times_out_at_startup_is_started_again_once():
    """The cluster helper's guard against a raylet that dies silently as it starts."""
    calls = []

    def once_late():
        calls.append("try")
        if len(calls) == 1:
            raise Exception("The current node timed out during startup. This could happen because ...")
        return "node"

    assert multinode.started(once_late, "head node") == "node" and calls == ["try", "try"]
    calls.clear()

    def always_late():
        calls.append("try")
        raise Exception("The current node timed out during startup.")

    with pytest.raises(Exception, match="timed out during startup"):
        multinode.started(always_late, "head node")
    assert calls == ["try", "try"]
    calls.clear()

    def broken():
        calls.append("try")
        raise ValueError("bad arguments")

    with pytest.raises(ValueError):
        multinode.started(broken, "head node")
    assert calls == ["try"]  # any other failure is not retried
