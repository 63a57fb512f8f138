"""`ray job submit -- python -m bagel_ray.jobs.bulk` on a real local Ray cluster (its own,
started with `ray start --head`), standalone with Ray Data on the tiny model: every output
equals LocalPipeline's for the same seeds (images denoised together on a DiT actor too), a
broken item is recorded as failed, and a job stopped midway and submitted again ends with
every item exactly once."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bagel_ray.engine.request import GenerationRequest
from bagel_ray.model.tiny import tiny_model_path
from tests.conftest import REPO_ROOT
from tests.jobs import cluster
from tests.jobs.reference import assert_matches_local, mixed_input, reference_pipeline, read_records, write_jsonl

# The actors' CPU shares: the 2-core test machine runs two pools and the job's driver.
SMALL = ["--device", "cpu", "--thinker-cpus", "0.25", "--dit-cpus", "0.25", "--progress-interval", "1"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The tiny model, made once in the cache the cluster's workers are given."""
    return tiny_model_path(tmp_path_factory.mktemp("bulk-cache"))


@pytest.fixture(scope="module")
def job_cluster(model_dir):
    c = cluster.start(cache=model_dir.parent)
    try:
        yield c
    finally:
        cluster.stop(c)


def submit(c: cluster.JobCluster, args: list[str], wait: bool = True) -> tuple[str, str]:
    """`ray job submit --working-dir <repo>` of the bulk command: (job id, the CLI's output)."""
    job_id = f"bulk-{uuid.uuid4().hex[:8]}"
    flags = ["--submission-id", job_id, "--runtime-env", str(REPO_ROOT / "deployments" / "bulk_runtime_env.yaml"),
             "--working-dir", str(REPO_ROOT)]  # the README's runtime_env, with `working_dir: .` made absolute
    done = c.ray("job", "submit", *flags, *([] if wait else ["--no-wait"]), "--",
                 "python", "-m", "bagel_ray.jobs.bulk", *args, timeout=400, check=False)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    return job_id, done.stdout + done.stderr


def wait_for(read, want, timeout_s: float, what: str) -> None:
    """Poll `read()` until `want(value)`."""
    deadline = time.monotonic() + timeout_s
    while not want(value := read()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last: {value!r})")
        time.sleep(0.2)


def test_mixed_job_matches_local(job_cluster, model_dir, tmp_path):
    inputs, expected = mixed_input(tmp_path / "in")
    out = tmp_path / "out"
    job_id, output = submit(job_cluster, ["--model", "tiny", "--input", str(inputs), "--output", str(out), *SMALL])
    assert job_cluster.job_status(job_id) == "SUCCEEDED", output
    logs = job_cluster.job_logs(job_id)
    assert "bulk: 7 items in" in logs and "7 to run" in logs
    assert "bulk: finished: 7/7 done, 2 failed" in logs, logs
    with reference_pipeline(model_dir) as local:
        records = {r["id"]: r for r in assert_matches_local(out, expected, local)}
    assert "cannot read image" in records["broken-image"]["error"]
    assert records["broken-steps"]["error"] == 'num_inference_steps must be an integer, got "many"'
    assert records["t2i"]["timings"]["handoff_bytes"] > 0  # Thinker -> DiT through the KV handoff


def test_images_denoised_together_match_local(job_cluster, model_dir, tmp_path):
    """Same-size images stepped together on a DiT actor (`--dit-batch-size`), beside an edit
    and a broken item: each within `PIXEL_TOL` of its image alone (tests/determinism.py)."""
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    picture.save(tmp_path / "in.png")
    every_step = {"steps": 4, "cfg_interval": [0.0, 1.0]}
    items = [{"id": f"t2i-{i}", "prompt": f"picture number {i}", "seed": i, "height": 32, "width": 32, **every_step}
             for i in range(5)]
    items += [{"id": "i2i", "modality": "img2img", "prompt": "Make it night.", "image": "in.png", "seed": 9, **every_step},
              {"id": "broken", "prompt": "x", "height": 20}]
    expected = {item["id"]: GenerationRequest("text2img", item["prompt"], seed=item["seed"], height=32, width=32, num_inference_steps=4,
                                              cfg_interval=(0.0, 1.0)) for item in items[:5]}
    expected |= {"i2i": GenerationRequest("img2img", "Make it night.", image=picture, seed=9, num_inference_steps=4, cfg_interval=(0.0, 1.0)),
                 "broken": None}
    inputs = write_jsonl(tmp_path / "input.jsonl", items)
    out = tmp_path / "out"
    job_id, output = submit(job_cluster, ["--model", "tiny", "--input", str(inputs), "--output", str(out),
                                          "--dit-batch-size", "4", *SMALL])
    assert job_cluster.job_status(job_id) == "SUCCEEDED", output
    with reference_pipeline(model_dir) as local:
        assert_matches_local(out, expected, local)


def test_stopped_job_resumes_with_every_item_once(job_cluster, tmp_path):
    n = 32
    items = [{"id": f"img-{i:02d}", "prompt": f"picture number {i}", "seed": i} for i in range(n)]
    inputs = write_jsonl(tmp_path / "input.jsonl", items)
    out = tmp_path / "out"
    # Slow enough per item (128x128, 200 steps: ~0.7 s), and records coming two at a time (DiT
    # batches of 2), for `ray job stop` to land part-way: with batches of 8, half of 16 items
    # were left when the first records came, and on a loaded host the job ended before the stop.
    args = ["--model", "tiny", "--input", str(inputs), "--output", str(out), "--modality", "text2img",
            "--steps", "200", "--height", "128", "--width", "128", "--dit-batch-size", "2", *SMALL]
    job_id, _ = submit(job_cluster, args, wait=False)

    def records_so_far() -> int:
        path = out / "results.jsonl"
        return path.read_bytes().count(b"\n") if path.exists() else 0

    wait_for(records_so_far, lambda k: k >= 2, 180, "the first records")
    job_cluster.ray("job", "stop", job_id, timeout=120)
    wait_for(lambda: job_cluster.job_status(job_id), lambda s: s == "STOPPED", 60, "the job to stop")
    first_run = (out / "results.jsonl").read_bytes()
    complete = first_run[: first_run.rfind(b"\n") + 1]  # a kill mid-write may leave a partial last line
    done_first = [json.loads(line)["id"] for line in complete.splitlines()]
    print(f"stopped after {len(done_first)} of {n}")
    assert 2 <= len(done_first) < n, "the job was not stopped midway"
    kept = {i: ((out / f"{i}.png").read_bytes(), (out / f"{i}.png").stat().st_mtime_ns) for i in done_first}

    job_id, _ = submit(job_cluster, args)
    assert job_cluster.job_status(job_id) == "SUCCEEDED"
    logs = job_cluster.job_logs(job_id)
    assert f"{len(done_first)} ok and 0 failed in earlier runs, {n - len(done_first)} to run" in logs, logs
    final = (out / "results.jsonl").read_bytes()
    assert final.startswith(complete)  # earlier records untouched
    records = read_records(out)
    assert sorted(r["id"] for r in records) == sorted(item["id"] for item in items)  # every item exactly once
    assert all(r["status"] == "ok" and r["output"] == f"{r['id']}.png" for r in records)
    for item_id, (data, mtime) in kept.items():  # nothing produced twice
        assert (out / f"{item_id}.png").read_bytes() == data and (out / f"{item_id}.png").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in out.iterdir()) == sorted([".bulk.lock", "results.jsonl", *(f"{i['id']}.png" for i in items)])
