"""The stage deployments' own code, in this process (no Serve): CUDA out-of-memory handling,
cancellation stopping the engine loops mid-way, and the DiT's batch of concurrent requests.

The deployment classes are built from `func_or_class` on the tiny model. Out-of-memory is
injected where a GPU would raise it, in the engine call the replica makes; everything
around it (splitting, retrying, the error, the lock, the next request) is the real code.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace

import pytest
import torch
import yaml
from PIL import Image

from bagel_ray.engine.cancel import Cancelled
from bagel_ray.engine.request import GenerationRequest
from bagel_ray.serve import metrics
from bagel_ray.engine.errors import EngineOutOfMemory
from bagel_ray.serve.stages import DiTServer, ThinkerServer
from bagel_ray.serve.workers import TextJob, understand_jobs
from tests.conftest import REPO_ROOT, outlasting
from tests.determinism import TOL, torch_threads, worker_thread_count


def oom() -> torch.cuda.OutOfMemoryError:
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")


@pytest.fixture(scope="module", autouse=True)
def replica_threads():
    """A replica's intra-op thread count, from before the replicas' engine threads start, for
    the engines here and the references (tests/determinism.py)."""
    with torch_threads(worker_thread_count()):
        yield


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

    def understand_batch(batch, should_stop=None, prompts=None):
        batches.append([r.prompt for r in batch])
        if len(batch) > 2 or any(r.prompt == "the huge one" for r in batch):
            raise oom()
        return real(batch, should_stop, prompts)

    monkeypatch.setattr(thinker.pipeline, "understand_batch", understand_batch)
    results = understand_jobs(thinker.pipeline, [TextJob(r) for r in reqs])
    # tried whole first, then in halves, down to the one request that cannot fit alone
    assert batches == [[r.prompt for r in reqs], ["one", "two"], ["the huge one", "four", "five"], ["the huge one"], ["four", "five"]]
    for req, result in zip(reqs, results):
        if req.prompt == "the huge one":
            assert isinstance(result, EngineOutOfMemory) and "out of accelerator memory" in str(result)
        else:
            assert result.text == want[req.prompt]
    monkeypatch.undo()
    assert not thinker.lock._lock.locked()
    assert understand_jobs(thinker.pipeline, [TextJob(text("after"))])[0].text  # the replica keeps serving


def test_oom_in_image_stages_fails_the_request_and_the_replica_goes_on(thinker, dit, monkeypatch):
    req = GenerationRequest("text2img", "a fox", num_inference_steps=3, height=32, width=32, seed=2)
    monkeypatch.setattr(thinker.pipeline, "prepare_image", lambda *a, **k: (_ for _ in ()).throw(oom()))
    with pytest.raises(EngineOutOfMemory):
        asyncio.run(thinker.prepare_image(req))
    monkeypatch.setattr(dit.pipeline.dit, "step", lambda *a, **k: (_ for _ in ()).throw(oom()))
    with pytest.raises(EngineOutOfMemory):
        asyncio.run(dit.generate(req))
    monkeypatch.undo()
    assert not dit.lock._lock.locked() and not thinker.lock._lock.locked()
    handoff = asyncio.run(thinker.prepare_image(req))
    assert asyncio.run(dit.render(req, handoff)).image.size == (32, 32)


def test_the_dit_makes_the_noise_and_keeps_latents_nobody_asked_for(thinker, dit):
    """The Thinker hands over contexts and think text, no noise: the DiT makes it from the seed,
    and the result is the one-process one (edits through the handoff: test_two_stage). A
    request that does not ask for latents (the HTTP API's) gets none back from the replica."""
    req = GenerationRequest("text2img", "a fox at night", num_inference_steps=3, height=32, width=32, seed=12)
    handoff = asyncio.run(thinker.prepare_image(req))
    assert "noise" not in vars(handoff)
    got = asyncio.run(dit.render(req, handoff))
    torch.testing.assert_close(got.latent_tokens, dit.pipeline.run(req).latent_tokens, **TOL)
    bare = asyncio.run(dit.render(replace(req, return_latents=False), asyncio.run(thinker.prepare_image(req))))
    assert bare.latent_tokens is None and bare.image == got.image


def test_cancelling_a_call_stops_denoising_at_the_next_step(dit, monkeypatch):
    steps: list[float] = []
    monkeypatch.setattr(metrics, "count_step", lambda: steps.append(time.monotonic()))
    req = GenerationRequest("text2img", "a long one", num_inference_steps=500, height=128, width=128, seed=3)

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
    jobs = [TextJob(text("go on and on", 4000)), TextJob(text("and on", 4000))]
    out: list = []
    worker = threading.Thread(target=lambda: out.extend(understand_jobs(thinker.pipeline, jobs)))
    t0 = time.monotonic()
    worker.start()
    time.sleep(0.3)
    for job in jobs:
        job.cancel.set()
    worker.join(timeout=10)
    assert not worker.is_alive() and time.monotonic() - t0 < 5
    assert all(isinstance(r, Cancelled) for r in out)

    # think decoding of an image request, on the Thinker and on a DiT that builds contexts itself
    think = GenerationRequest("text2img", "plan first", think=True, max_think_tokens=3900, num_inference_steps=2, height=32, width=32)

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
        stream = thinker.understand_stream(text("stream on and on", 4000))
        async for _ in stream:
            break
        await stream.aclose()

    asyncio.run(read_a_few())
    assert thinker.lock._lock.acquire(timeout=5)
    thinker.lock._lock.release()


def image_requests(n: int, steps: int = 6) -> list[GenerationRequest]:
    """Same-size text2img requests of different prompts, seeds and steps, with CFG at every
    step (two blocks a step each: bit for bit equal batched or alone on this machine's CPU at
    one thread; within `TOL` on other CPUs' BLAS or at other thread counts, see
    tests/determinism.py)."""
    return [GenerationRequest("text2img", f"picture {i}", seed=10 + i, num_inference_steps=steps + i, height=32, width=32,
                              cfg_interval=(0.0, 1.0), cfg_img_scale=1.0 + 0.5 * i) for i in range(n)]


async def gather(*calls):
    return await asyncio.gather(*calls, return_exceptions=True)


def test_concurrent_image_requests_are_denoised_together(dit):
    reqs = image_requests(4)
    want = [dit.pipeline.run(r) for r in reqs]
    got = asyncio.run(gather(*(dit.generate(r) for r in reqs)))
    assert max(g.timings["denoise_batch"] for g in got) > 1
    for g, w in zip(got, want):
        torch.testing.assert_close(g.latent_tokens, w.latent_tokens, **TOL)


def test_oom_halves_the_image_batch_and_fails_only_the_request_that_cannot_fit(dit, monkeypatch):
    reqs = image_requests(4)
    huge = reqs[1]
    want = {r.prompt: dit.pipeline.run(r).latent_tokens for r in reqs if r is not huge}
    engine = dit.pipeline.dit
    real = engine.velocities
    forwards: list[int] = []

    def velocities(x, t, contexts, *args, **kwargs):  # huge's noise is its own: find its blocks by it
        forwards.append(len(contexts))
        if len(contexts) > 4 or any(torch.equal(block, huge_noise) for block in x):
            raise oom()
        return real(x, t, contexts, *args, **kwargs)

    huge_noise = dit.pipeline.prepare_image(huge).noise
    monkeypatch.setattr(engine, "velocities", velocities)
    got = asyncio.run(gather(*(dit.generate(r) for r in reqs)))
    monkeypatch.undo()
    for req, result in zip(reqs, got):
        if req is huge:
            assert isinstance(result, EngineOutOfMemory) and "out of accelerator memory" in str(result)
        else:
            torch.testing.assert_close(result.latent_tokens, want[req.prompt], **TOL, msg=req.prompt)
    assert max(forwards) > 4  # a batch too big was tried, and split
    assert dit.lock._lock.acquire(timeout=5)
    dit.lock._lock.release()


def test_a_cancelled_request_leaves_its_batch(dit):
    reqs = image_requests(3)
    long = outlasting(GenerationRequest("text2img", "a long one", seed=3, height=32, width=32, cfg_interval=(0.0, 1.0)), 5000)
    want = [dit.pipeline.run(r) for r in reqs]

    async def scenario():
        task = asyncio.create_task(dit.generate(long))
        await asyncio.sleep(0.2)
        got = await gather(*(dit.generate(r) for r in reqs))
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        after = await dit.generate(reqs[0])
        return got, after

    got, after = asyncio.run(scenario())
    for g, w in zip(got, want):
        assert g.timings["denoise_batch"] > 1  # denoised beside the long one
        torch.testing.assert_close(g.latent_tokens, w.latent_tokens, **TOL)
    assert after.timings["denoise_batch"] == 1  # the long one has gone


def test_the_denoising_thread_builds_waiting_plans_when_idle_and_keeps_serving(dit, monkeypatch):
    """The worker's side of deferred attention plans (`attention.build_plan` itself needs a
    GPU: tests/model/test_attention.py): with plans waiting, an idle worker builds them one at
    a time in its own thread, and requests are served between and after."""
    from bagel_ray.model import attention

    waiting, built_in = [3], []

    def build_plan() -> bool:
        built_in.append(threading.current_thread().name)
        time.sleep(0.05)
        waiting[0] -= 1
        return True

    monkeypatch.setattr(attention, "plans_pending", lambda: waiting[0])
    monkeypatch.setattr(attention, "build_plan", build_plan)
    before = dit.worker.plans_built
    req = image_requests(1)[0]
    first = asyncio.run(dit.generate(req))  # wakes the worker (it blocked with nothing waiting)
    deadline = time.monotonic() + 30
    while waiting[0] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert waiting[0] == 0 and dit.worker.plans_built == before + 3 and dit.worker.plans_waiting == 0
    assert built_in == ["dit-denoise"] * 3
    again = asyncio.run(dit.generate(req))  # the worker blocks again, and wakes for the next request
    assert torch.equal(first.latent_tokens, again.latent_tokens) and len(built_in) == 3


def test_image_results_leave_a_gpu_dit_with_their_latents_on_the_cpu(args):
    """A caller without a GPU (an ingress on a CPU node) must be able to unpickle the result."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    gpu_args = {**args, "dit": {**args["dit"], "device": "cuda", "dtype": "bfloat16"}}
    server = DiTServer.func_or_class(gpu_args)
    req = image_requests(1)[0]
    result = asyncio.run(server.generate(req))
    assert result.latent_tokens.device.type == "cpu"
    # the replica ran this new length's attention on flash, the pipeline here on the default kernel
    want = server.pipeline.run(req).latent_tokens.cpu().float()
    assert (result.latent_tokens.float() - want).norm() <= 0.05 * want.norm()


def test_a_gpu_dit_runs_unseen_lengths_on_flash_and_plans_them_between_requests(args):
    """A prompt length the replica has not denoised costs no cuDNN plan on its request: its
    attention runs on flash, and the worker builds the plans once it is idle."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("needs a Hopper GPU (where SDPA's default kernel is cuDNN)")
    from torch.profiler import ProfilerActivity, profile

    server = DiTServer.func_or_class({**args, "dit": {**args["dit"], "device": "cuda", "dtype": "bfloat16"}})
    req = image_requests(1)[0]

    def generate():
        with profile(activities=[ProfilerActivity.CUDA]) as prof:  # kernels of every thread
            result = asyncio.run(server.generate(req))
            torch.cuda.synchronize()
        return result, [e.name.lower() for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]

    first, kernels_first = generate()
    deadline = time.monotonic() + 60
    while server.worker.plans_waiting and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.worker.plans_waiting == 0 and server.worker.plans_built > 0
    second, kernels_second = generate()
    flash_first, flash_second = (sum("flash" in k for k in ks) for ks in (kernels_first, kernels_second))
    assert flash_first > flash_second  # the denoising's attention moved off flash (the prefills stay)
    assert any("cudnn" in k and k not in kernels_first for k in kernels_second)  # onto cuDNN's attention
    a, b = first.latent_tokens.float(), second.latent_tokens.float()
    assert (a - b).norm() <= 0.05 * b.norm()  # the two kernels differ by bf16 rounding


# -- the deployments as shells: an injected engine, a start-up timeout, real health checks --


def test_a_deployment_runs_the_engine_it_is_given(args, thinker):
    """The engine comes from the factory passed at bind time (here the loaded one of the
    module's Thinker, so nothing is loaded twice)."""
    given = []

    def engine(config):
        given.append(config.model)
        return thinker.pipeline

    server = ThinkerServer.func_or_class(args, engine=engine)
    assert given == [args["model"]] and server.pipeline is thinker.pipeline
    req = text("injected", 4)
    assert asyncio.run(server.understand(req)).text == thinker.pipeline.understand(req).text


def test_an_engine_that_does_not_start_in_time_fails_the_replica_start(args):
    release = threading.Event()

    def hanging(config):  # a load stuck on a file system that never answers
        release.wait(30)
        raise RuntimeError("released")

    slow = {**args, "thinker": {**args["thinker"], "startup_timeout_s": 0.3}}
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="did not start within startup_timeout_s=0.3"):
        ThinkerServer.func_or_class(slow, engine=hanging)
    assert time.monotonic() - t0 < 5
    release.set()


def test_the_thinker_health_check_fails_once_its_decoding_thread_has_died(args, thinker, monkeypatch):
    server = ThinkerServer.func_or_class(args, engine=lambda config: thinker.pipeline)
    server.check_health()  # healthy before its first request (the thread starts with it)
    assert asyncio.run(server.understand(text("alive", 2))).text is not None
    server.check_health()

    def broken_run(self):  # a fault of the decoding loop itself, not of one request
        raise RuntimeError("a bug in the decode loop")

    from bagel_ray.engine.decoder import ContinuousDecoder

    monkeypatch.setattr(ContinuousDecoder, "run", broken_run)
    job = TextJob(text("this one kills the loop", 2))

    async def submit():
        job.future = asyncio.get_running_loop().create_future()
        server.decode_worker.submit(job)
        await asyncio.sleep(0.5)

    asyncio.run(submit())
    server.decode_worker.thread.join(timeout=10)
    with pytest.raises(RuntimeError, match="decoding thread has died"):
        server.check_health()


def test_a_prompt_too_long_is_refused_without_waiting_for_the_engine(thinker, dit):
    """The prompt is tokenized and checked before the engine lock: while the engine is busy
    (the lock held here), a request past max_model_len is refused at once, and one that fits
    waits its turn."""
    from bagel_ray.engine.errors import PromptTooLong

    long = "many words " * thinker.config.thinker.max_model_len
    calls = [
        lambda: thinker.understand(text(long, 2)),
        lambda: thinker.understand(GenerationRequest("text2text", long, max_tokens=2, do_sample=True, seed=1)),
        lambda: thinker.prepare_image(GenerationRequest("text2img", long, num_inference_steps=2, height=32, width=32)),
        lambda: dit.generate(GenerationRequest("img2img", long, image=Image.new("RGB", (32, 32)), num_inference_steps=2)),
    ]

    async def refused(call) -> float:
        t0 = time.monotonic()
        with pytest.raises(PromptTooLong):
            await call()
        return time.monotonic() - t0

    async def stream_refused() -> None:
        with pytest.raises(PromptTooLong):
            async for _ in thinker.understand_stream(text(long, 2)):
                pass

    for server in (thinker, dit):
        assert server.lock._lock.acquire(timeout=10)
    try:
        for call in calls:
            assert asyncio.run(refused(call)) < 5
        asyncio.run(stream_refused())
    finally:
        thinker.lock._lock.release()
        dit.lock._lock.release()
    assert asyncio.run(thinker.understand(text("fits", 2))).text is not None
