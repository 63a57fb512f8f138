"""The two GPU stages as Ray Serve deployments: shells that wire an engine to Serve.

`ThinkerServer` holds the understanding side (text answers, think text, the KV contexts of
image requests); `DiTServer` holds the denoiser and the VAE. Each gets its engine (a
`LocalPipeline`) from a factory passed in at bind time (`engine=`, by default the one of
`engines.py` that loads the configured checkpoint), within `startup_timeout_s`, and hands
requests to the Ray-free batching workers of `workers.py`. KV contexts leave the Thinker
through the configured transport and reach the DiT without passing through the driver.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import torch
from ray import serve

from bagel_ray.engine.cancel import Cancelled
from bagel_ray.engine.pipeline import LocalPipeline, PreparedImage
from bagel_ray.engine.request import GenerationRequest, GenerationResult
from bagel_ray.serve import metrics
from bagel_ray.serve.config import AppConfig
from bagel_ray.serve.engines import EngineFactory, dit_engine, rank_dit, thinker_engine
from bagel_ray.serve.replica import ModelInfo, logs_into_serve
from bagel_ray.serve.workers import DecodeWorker, DenoiseWorker, EngineLock, ImageJob, TextJob, out_of_memory, understand_jobs
from bagel_ray.transport import ray_peer
from bagel_ray.transport.base import make_transport

log = logging.getLogger("bagel_ray.serve")


@dataclass
class Handoff:
    """What the Thinker returns for an image request: the packed contexts (a transport
    payload) and the think text. The initial noise is not in it: the DiT makes it from the
    request's seed (`LocalPipeline.initial_noise`)."""

    payload: Any
    think_text: str | None
    think_token_ids: list[int] | None
    timings: dict[str, float] = field(default_factory=dict)
    node: str = ""  # the Ray node of the sender: the receiver records whether the handoff crossed nodes


def start_engine(stage: str, factory: EngineFactory, config: AppConfig, timeout_s: float) -> LocalPipeline:
    """`factory(config)`, given up on after `timeout_s`: a replica whose engine hangs while
    loading (a stuck file system, a device that never answers) fails its start with a clear
    error, and Serve starts another, instead of the replica waiting forever."""
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{stage}-start")
    try:
        pipeline = pool.submit(factory, config).result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        raise TimeoutError(f"the {stage} engine did not start within startup_timeout_s={timeout_s}s") from None
    finally:
        pool.shutdown(wait=False)
    return pipeline


@serve.deployment(name="Thinker")
class ThinkerServer:
    def __init__(self, app_config: dict, engine: EngineFactory = thinker_engine) -> None:
        logs_into_serve()
        self.config = AppConfig.model_validate(app_config)
        stage = self.config.thinker
        t0 = time.perf_counter()
        self.pipeline = start_engine("Thinker", engine, self.config, stage.startup_timeout_s)
        self.pipeline.max_model_len = stage.max_model_len  # its prompts are checked where they are tokenized
        # a DiT replica of several ranks: each rank gets its share of the contexts from the payload
        self.transport = make_transport(self.config.dit.transport, self.config.dit.parallel.size)
        self.lock = EngineLock()
        self.understand_batched.set_max_batch_size(stage.max_batch_size)
        self.understand_batched.set_batch_wait_timeout_s(stage.batch_wait_timeout_s)
        self.decode_worker = DecodeWorker(self.pipeline, self.lock, stage.max_batch_size, stage.max_decode_len,
                                          lambda jobs: understand_jobs(self.pipeline, jobs))
        model = self.pipeline.thinker_engine.model
        log.info("Thinker ready in %.1fs on %s (%s), transport %s", time.perf_counter() - t0, model.device, model.dtype,
                 self.transport.name)

    def model_info(self) -> ModelInfo:
        cfg = self.pipeline.cfg
        return ModelInfo(cfg.max_image_side, cfg.latent_downsample, self.config.thinker.max_model_len,
                         self.pipeline.thinker_engine.tokenizer.max_token_bytes)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def understand_batched(self, jobs: list[TextJob]) -> list[GenerationResult | Exception]:
        return await self.lock.run("understand", lambda _stop: understand_jobs(self.pipeline, jobs))

    async def understand(self, req: GenerationRequest) -> GenerationResult:
        """text2text / img2text. Greedy requests join the continuous decoding batch; sampled
        ones are decoded together in batches of their own (each with its own generator)."""
        t0 = time.perf_counter()
        job = TextJob(req)
        try:
            if req.do_sample:
                # tokenized and checked before the batch takes the engine lock
                job.prompt = await asyncio.to_thread(self.pipeline.prompt_tokens, req)
                outcome = await self.understand_batched(job)
            else:
                job.future = asyncio.get_running_loop().create_future()
                self.decode_worker.submit(job)
                outcome = await asyncio.shield(job.future)
        except asyncio.CancelledError:
            job.cancel.set()
            raise
        if isinstance(outcome, Exception):
            raise outcome
        metrics.observe_stage("thinker", time.perf_counter() - t0)
        return outcome

    async def understand_stream(self, req: GenerationRequest) -> AsyncIterator[str | GenerationResult]:
        """Text deltas, then the result (streaming bypasses batching). Decoding stops at the
        next token once the consumer goes away."""
        prompt = await asyncio.to_thread(self.pipeline.prompt_tokens, req)  # checked off the engine lock

        def produce(emit, should_stop) -> None:
            for item in self.pipeline.understand_stream(req, prompt):
                if should_stop():
                    raise Cancelled("understand_stream: the consumer went away")
                emit(item)

        async for item in self.lock.stream("understand_stream", produce):
            yield item

    async def prepare_image(self, req: GenerationRequest) -> Handoff:
        """Contexts (and think text) of a text2img / img2img request, packed for the DiT."""
        t0 = time.perf_counter()
        prompt = await asyncio.to_thread(self.pipeline.prompt_tokens, req)  # checked off the engine lock

        def prepare(stop: Callable[[], bool]) -> tuple[PreparedImage, Any]:
            # Sent under the engine lock, in its thread: packing never blocks the event loop,
            # and no other request's CUDA-graph capture runs in this process meanwhile.
            prepared = self.pipeline.prepare_image(req, stop, prompt, noise=False)
            return prepared, self.transport.send(prepared.contexts)

        prepared, payload = await self.lock.run("prepare_image", prepare)
        metrics.observe_stage("thinker", time.perf_counter() - t0)
        return Handoff(payload, prepared.think_text, prepared.think_token_ids, prepared.timings, ray_peer.node_id())

    def check_health(self) -> None:
        """Serve restarts a replica whose continuous-decoding thread has died: its greedy text
        requests would otherwise wait forever."""
        if self.pipeline.thinker is None:
            raise RuntimeError("Thinker engine missing")
        if not self.decode_worker.alive:
            raise RuntimeError("the Thinker's decoding thread has died")


@serve.deployment(name="DiT")
class DiTServer:
    def __init__(self, app_config: dict, engine: EngineFactory = dit_engine) -> None:
        logs_into_serve()
        self.config = AppConfig.model_validate(app_config)
        t0 = time.perf_counter()
        self.pipeline = start_engine("DiT", engine, self.config, self.config.dit.startup_timeout_s)
        if self.pipeline.dit is None:
            raise ValueError("the DiT stage's engine factory returned a pipeline without a DiT engine")
        self.pipeline.max_model_len = self.config.thinker.max_model_len  # img2img prompts tokenized here
        self.device = self.pipeline.dit.model.device
        self.transport = make_transport(self.config.dit.transport, self.config.dit.parallel.size)
        self.lock = EngineLock()
        batch = self.config.dit.max_batch_size
        self.group = None
        if self.config.dit.parallel.size > 1:  # one request over several ranks: serve/dit_group.py
            from bagel_ray.serve.dit_group import DiTGroup, GroupBatch

            self.group = DiTGroup(self.pipeline.dit, self.config, app_config, rank_dit, self.transport)
            self.worker = DenoiseWorker(self.pipeline, self.lock, batch, lambda: GroupBatch(self.group, batch))
        else:
            self.worker = DenoiseWorker(self.pipeline, self.lock, batch)
        # Contexts received here at once (off the engine lock): a full batch denoising, and
        # the next one arriving meanwhile.
        self.handoff_slots = asyncio.Semaphore(batch + 1)
        model = self.pipeline.dit.model
        log.info("DiT ready in %.1fs on %s (%s), up to %d requests a batch", time.perf_counter() - t0, model.device,
                 model.dtype, batch)

    def _received(self, req: GenerationRequest, handoff: Handoff) -> PreparedImage:
        contexts, stats = self.transport.receive(handoff.payload, self.device)
        crossed = handoff.node != ray_peer.node_id()
        metrics.observe_handoff(stats, crossed)
        timings = dict(handoff.timings, handoff_bytes=float(stats.nbytes), handoff_send_s=stats.send_s,
                       handoff_receive_s=stats.receive_s, handoff_crossed_nodes=float(crossed),
                       **{f"handoff_via_{stats.route}": 1.0})
        noise = self.pipeline.initial_noise(req, contexts)
        return PreparedImage(contexts, noise, handoff.think_text, handoff.think_token_ids, timings)

    async def _receive(self, req: GenerationRequest, handoff: Handoff | None) -> PreparedImage | None:
        """The handoff's contexts, received in a worker thread outside the engine lock, and
        the request's initial noise, made here from its seed."""
        if handoff is None:
            return None
        try:
            return await asyncio.to_thread(self._received, req, handoff)
        except torch.cuda.OutOfMemoryError as exc:
            raise out_of_memory("receive", exc) from None

    async def _images(self, req: GenerationRequest, prepared: PreparedImage | None, progress: bool,
                      handoff: Handoff | None = None) -> AsyncIterator[dict | GenerationResult]:
        """The request through the denoising batch (its contexts built here when None):
        progress events `{"step", "total", "t"}` when asked for, then the result. When the
        caller goes away (cancelled, or the stream closed) its job stops at the next step.
        `handoff`: what the contexts came in (a parallel replica's worker ranks fetch theirs)."""
        job = ImageJob(req, prepared, progress, asyncio.get_running_loop(), handoff=handoff)
        self.worker.submit(job)
        try:
            while True:
                item = await job.items.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, GenerationResult):
                    return
        finally:
            job.cancel.set()
            if handoff is not None and self.group is not None:
                # Rank 0 lets go of a handoff the sender keeps for the worker ranks as soon as they
                # hold their shares (`DiTGroup`); here, of one whose job ended before that (it
                # failed, or was cancelled, before joining the group). A later share request finds
                # it gone, and rank 0 relays. Off the event loop: it may message the sender.
                asyncio.get_running_loop().run_in_executor(None, self.transport.release, handoff.payload)

    async def _image(self, req: GenerationRequest, prepared: PreparedImage | None,
                     handoff: Handoff | None = None) -> GenerationResult:
        async with contextlib.aclosing(self._images(req, prepared, False, handoff)) as items:
            async for result in items:
                return result
        raise RuntimeError("the denoising worker ended without a result")  # unreachable: it sends one or an error

    async def render(self, req: GenerationRequest, handoff: Handoff) -> GenerationResult:
        """Denoise and decode over contexts the Thinker prepared."""
        t0 = time.perf_counter()
        async with self.handoff_slots:
            result = await self._image(req, await self._receive(req, handoff), handoff)
        metrics.observe_stage("dit", time.perf_counter() - t0)
        return result

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        """A whole image request on this replica (img2img when the DiT builds edit contexts)."""
        t0 = time.perf_counter()
        result = await self._image(req, None)
        metrics.observe_stage("dit", time.perf_counter() - t0)
        return result

    async def render_stream(self, req: GenerationRequest, handoff: Handoff | None) -> AsyncIterator[dict | GenerationResult]:
        """Progress events `{"step", "total", "t"}` while denoising, then the result.
        With no handoff the request runs whole on this replica."""
        async with self.handoff_slots if handoff is not None else contextlib.nullcontext():
            prepared = await self._receive(req, handoff)
            async with contextlib.aclosing(self._images(req, prepared, True, handoff)) as items:
                async for item in items:
                    yield item

    def check_health(self) -> None:
        if self.pipeline.dit is None:
            raise RuntimeError("DiT engine missing")
        if not self.worker.alive:
            raise RuntimeError("the DiT's denoising thread has died")
        if self.group is not None:
            self.group.check_health()

    def group_workers(self) -> list:
        """The worker-rank actors of a parallel replica (none otherwise)."""
        return [] if self.group is None else list(self.group.workers)

    def group_steps(self) -> dict[str, int]:
        """A parallel replica's batched steps so far and the most requests one of them carried
        (empty otherwise)."""
        return {} if self.group is None else {"steps": self.group.steps, "most": self.group.most}

    def group_relayed_bytes(self) -> int:
        """Context bytes rank 0 of a parallel replica sent its worker ranks over the group (the
        shares they could not fetch from the handoff themselves)."""
        return 0 if self.group is None else self.group.relayed_bytes

