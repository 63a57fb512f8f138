"""The stage deployments' own code, in this process (no Serve): CUDA out-of-memory handling,
and cancellation stopping the engine loops mid-way.

The deployment classes are built from `func_or_class` on the tiny model. Out-of-memory is
injected where a GPU would raise it, in the pipeline call the replica makes; everything
around it (splitting, retrying, the error, the lock, the next request) is the real code.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
import yaml

from bagel_ray.engine.cancel import Cancelled
from bagel_ray.engine.request import GenerationRequest
from bagel_ray.serve import metrics
from bagel_ray.serve.stages import DiTServer, EngineOutOfMemory, TextJob, ThinkerServer
from tests.conftest import REPO_ROOT


def oom() -> torch.cuda.OutOfMemoryError:
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")


@pytest.fixture(scope="module")
def args(tiny_cache) -> dict:
    return yaml.safe_load((REPO_ROOT / "deployments" / "tiny.yaml").read_text())["applications"][0]["args"]


@pytest.fixture(scope="module")
def thinker(args):
    return ThinkerServer.func_or_class(args)


@pytest.fixture(scope="module")
def dit(args):
    return DiTServer.func_or_class(args)


def text(prompt: str, max_tokens: int = 6) -> GenerationRequest:
    return GenerationRequest("text2text", prompt, max_tokens=max_tokens, seed=1)


def test_oom_splits_the_batch_and_fails_only_the_request_that_cannot_fit(thinker, monkeypatch):
    reqs = [text("one"), text("two"), text("the huge one"), text("four"), text("five")]
    want = {r.prompt: thinker.pipeline.understand(r).text for r in reqs if r.prompt != "the huge one"}
    real = thinker.pipeline.understand_batch
    batches: list[list[str]] = []

    def understand_batch(batch, should_stop=None):
        batches.append([r.prompt for r in batch])
        if len(batch) > 2 or any(r.prompt == "the huge one" for r in batch):
            raise oom()
        return real(batch, should_stop)

    monkeypatch.setattr(thinker.pipeline, "understand_batch", understand_batch)
    results = thinker._understand([TextJob(r) for r in reqs])
    # tried whole first, then in halves, down to the one request that cannot fit alone
    assert batches == [[r.prompt for r in reqs], ["one", "two"], ["the huge one", "four", "five"], ["the huge one"], ["four", "five"]]
    for req, result in zip(reqs, results):
        if req.prompt == "the huge one":
            assert isinstance(result, EngineOutOfMemory) and "out of accelerator memory" in str(result)
        else:
            assert result.text == want[req.prompt]
    monkeypatch.undo()
    assert not thinker.lock._lock.locked()
    assert thinker._understand([TextJob(text("after"))])[0].text  # the replica keeps serving


def test_oom_in_image_stages_fails_the_request_and_the_replica_goes_on(thinker, dit, monkeypatch):
    req = GenerationRequest("text2img", "a fox", steps=3, height=32, width=32, seed=2)
    monkeypatch.setattr(thinker.pipeline, "prepare_image", lambda *a, **k: (_ for _ in ()).throw(oom()))
    with pytest.raises(EngineOutOfMemory):
        asyncio.run(thinker.prepare_image(req))
    monkeypatch.setattr(dit.pipeline, "render", lambda *a, **k: (_ for _ in ()).throw(oom()))
    with pytest.raises(EngineOutOfMemory):
        asyncio.run(dit.generate(req))
    monkeypatch.undo()
    assert not dit.lock._lock.locked() and not thinker.lock._lock.locked()
    handoff = asyncio.run(thinker.prepare_image(req))
    assert asyncio.run(dit.render(req, handoff)).image.size == (32, 32)


def test_cancelling_a_call_stops_denoising_at_the_next_step(dit, monkeypatch):
    steps: list[float] = []
    monkeypatch.setattr(metrics, "count_step", lambda: steps.append(time.monotonic()))
    req = GenerationRequest("text2img", "a long one", steps=500, height=128, width=128, seed=3)

    async def cancel_after_a_few_steps() -> int:
        task = asyncio.create_task(dit.generate(req))
        while len(steps) < 5:
            await asyncio.sleep(0.002)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return len(steps)

    at_cancel = asyncio.run(cancel_after_a_few_steps())
    assert dit.lock._lock.acquire(timeout=10)  # the worker thread let go of the engine
    dit.lock._lock.release()
    assert len(steps) <= at_cancel + 2 < 499, (at_cancel, len(steps))


def test_cancelling_stops_decoding(thinker, dit):
    # batched text: every job of the batch cancelled -> the decode ends at its next step
    jobs = [TextJob(text("go on and on", 20000)), TextJob(text("and on", 20000))]
    out: list = []
    worker = threading.Thread(target=lambda: out.extend(thinker._understand(jobs)))
    t0 = time.monotonic()
    worker.start()
    time.sleep(0.3)
    for job in jobs:
        job.cancel.set()
    worker.join(timeout=10)
    assert not worker.is_alive() and time.monotonic() - t0 < 5
    assert all(isinstance(r, Cancelled) for r in out)

    # think decoding of an image request, on the Thinker and on a DiT that builds contexts itself
    think = GenerationRequest("text2img", "plan first", think=True, max_think_tokens=20000, steps=2, height=32, width=32)

    async def cancel_soon(call) -> float:
        task = asyncio.create_task(call)
        await asyncio.sleep(0.3)
        task.cancel()
        t = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
        return t

    for server, call in ((thinker, thinker.prepare_image), (dit, dit.generate)):
        cancelled_at = asyncio.run(cancel_soon(call(think)))
        assert server.lock._lock.acquire(timeout=10)
        server.lock._lock.release()
        assert time.monotonic() - cancelled_at < 3


def test_a_stream_whose_consumer_goes_away_stops(thinker):
    async def read_a_few() -> None:
        stream = thinker.understand_stream(text("stream on and on", 20000))
        async for _ in stream:
            break
        await stream.aclose()

    asyncio.run(read_a_few())
    assert thinker.lock._lock.acquire(timeout=5)
    thinker.lock._lock.release()
