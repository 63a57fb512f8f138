"""The two GPU stages as Ray Serve deployments: thin shells around the engines.

`ThinkerServer` holds the understanding side (text answers, think text, the KV contexts of
image requests); `DiTServer` holds the denoiser and the VAE. They validate nothing about
the model and do no tensor math: they load the engines, call them under one lock per
replica, and map results. Both batch requests of different users step by step: the Thinker
decodes greedy text requests in one continuous batch (`DecodeWorker`), the DiT denoises
image requests of the same size together (`DenoiseWorker`). KV contexts leave the Thinker
through the configured transport and reach the DiT without passing through the driver.

A call whose caller goes away (deadline, client disconnect) stops at the engine's next
step. CUDA out-of-memory fails only the request that caused it (`EngineOutOfMemory`; a
batch is first split and retried), and the replica keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator

import torch
from ray import serve
from ray.serve.exceptions import RayServeException

from bagel_ray.engine.cancel import Cancelled
from bagel_ray.engine.continuous import ContinuousDecoder
from bagel_ray.engine.dit import DenoiseJob, DiT, StepRecord
from bagel_ray.engine.dit_batch import BatchDenoiser
from bagel_ray.engine.pipeline import DTYPES, LocalPipeline, PreparedImage
from bagel_ray.engine.request import GenerationRequest, GenerationResult
from bagel_ray.engine.thinker import Thinker
from bagel_ray.model import attention
from bagel_ray.model.loader import load_checkpoint
from bagel_ray.model.tokenizer import BagelTokenizer, clean_generated_text
from bagel_ray.routes import DIT, THINKER, stage_parts
from bagel_ray.serve import metrics
from bagel_ray.serve.config import AppConfig, StageConfig
from bagel_ray.transport import ray_peer
from bagel_ray.transport.base import make_transport

log = logging.getLogger("bagel_ray.serve")


def logs_into_serve() -> None:
    """In a Serve replica, this package's log records go where the replica's own do (its log
    file and the console of `serve run`): Serve sets up only its `ray.serve` logger there, so
    our INFO records (a stage ready, its load time, the transport it took) went nowhere.
    Outside a replica (tests, the engines alone) logging is left as it is."""
    try:
        serve.get_replica_context()
    except RayServeException:
        return
    serve_logger, ours = logging.getLogger("ray.serve"), logging.getLogger("bagel_ray")
    ours.handlers = list(serve_logger.handlers)
    ours.setLevel(serve_logger.level)
    ours.propagate = False


@dataclass
class Handoff:
    """What the Thinker returns for an image request: the packed contexts (a transport
    payload) plus the initial noise and the think text."""

    payload: Any
    noise: torch.Tensor
    think_text: str | None
    think_token_ids: list[int] | None
    timings: dict[str, float] = field(default_factory=dict)
    node: str = ""  # the Ray node of the sender: the receiver records whether the handoff crossed nodes


@dataclass(frozen=True)
class ModelInfo:
    """What the driver needs to validate requests without loading the model."""

    max_image_side: int
    latent_downsample: int
    max_model_len: int


def resolve_device(stage: StageConfig) -> tuple[str, torch.dtype]:
    device = stage.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = stage.dtype if stage.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    if device == "cuda":
        torch.cuda.set_per_process_memory_fraction(stage.gpu_memory_utilization)
    return device, DTYPES[dtype]


def thinker_parts(app: AppConfig) -> frozenset[str]:
    return stage_parts(THINKER, app.edit_contexts_on)


def dit_parts(app: AppConfig) -> frozenset[str]:
    return stage_parts(DIT, app.edit_contexts_on)


class EngineOutOfMemory(RuntimeError):
    """The accelerator ran out of memory for one request on its own. The replica has given
    the cached memory back and keeps serving; the driver answers 507."""


def release_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def out_of_memory(what: str, exc: BaseException) -> EngineOutOfMemory:
    release_memory()
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    log.warning("out of accelerator memory in %s: %s", what, first_line)
    return EngineOutOfMemory(f"{what} ran out of accelerator memory ({first_line}); try a smaller size or fewer tokens")


def _understand_error(exc: BaseException) -> BaseException:
    """What a text request that failed is handed: out-of-memory as `EngineOutOfMemory`."""
    return out_of_memory("understand", exc) if isinstance(exc, torch.cuda.OutOfMemoryError) else exc


class EngineLock:
    """One user of the model at a time per replica (a request, or one step or chunk of a
    batch worker), in a worker thread; waiting happens off the event loop and is recorded
    as queue wait.

    Each call carries a cancel flag. When the caller's task is cancelled (Serve cancels a
    replica call when the driver's deadline passes or the HTTP client disconnects) the flag
    is set, and the engine, which asks it once per step, stops with `Cancelled`; a call
    still waiting for the lock never starts. CUDA out-of-memory becomes `EngineOutOfMemory`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, observe: bool = True) -> Iterator[None]:
        """The engine, for this thread. `observe=False` for the steps of a batch worker, whose
        requests record their queue wait once, when they join the batch."""
        t0 = time.perf_counter()
        with self._lock:
            if observe:
                metrics.observe_queue_wait(time.perf_counter() - t0)
            yield

    def _locked(self, what: str, fn: Callable[[Callable[[], bool]], Any], cancel: threading.Event) -> Any:
        with self.hold():
            if cancel.is_set():
                raise Cancelled(f"{what}: cancelled before it started")
            try:
                return fn(cancel.is_set)
            except torch.cuda.OutOfMemoryError as exc:
                raise out_of_memory(what, exc) from None
            except Cancelled:
                log.info("%s: cancelled; its work stopped", what)
                raise

    async def run(self, what: str, fn: Callable[[Callable[[], bool]], Any]) -> Any:
        """`fn(should_stop)` under the lock, in a worker thread."""
        cancel = threading.Event()
        try:
            return await asyncio.to_thread(self._locked, what, fn, cancel)
        except asyncio.CancelledError:
            cancel.set()
            raise

    async def stream(self, what: str, produce: Callable[[Callable[[Any], None], Callable[[], bool]], None]) -> AsyncIterator[Any]:
        """Items that `produce(emit, should_stop)` emits under the lock in a worker thread, as
        they come. When the consumer goes away (the stream is closed or cancelled) the
        worker's `should_stop` turns true."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        end = object()

        def emit(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(items.put_nowait, item)
            except RuntimeError:  # the event loop is gone: nobody is listening
                cancel.set()

        def work() -> None:
            try:
                self._locked(what, lambda stop: produce(emit, stop), cancel)
                emit(end)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                emit(exc)

        threading.Thread(target=work, name=f"engine-{what}", daemon=True).start()
        try:
            while (item := await items.get()) is not end:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()


@dataclass
class TextJob:
    """A text request waiting in the Thinker's batch, with the flag its caller sets when it
    goes away, and (for the continuous decoder) the future its result goes to."""

    req: GenerationRequest
    cancel: threading.Event = field(default_factory=threading.Event)
    future: asyncio.Future | None = None
    started: float = field(default_factory=time.perf_counter)
    prefilled_s: float = 0.0

    def deliver(self, outcome: GenerationResult | BaseException) -> None:
        """Hand the outcome to the waiting caller (from the decode thread)."""
        fut = self.future

        def settle() -> None:
            if not fut.done():
                (fut.set_exception if isinstance(outcome, BaseException) else fut.set_result)(outcome)

        fut.get_loop().call_soon_threadsafe(settle)


class InboxWorker:
    """A batch worker's thread, started with the first job and fed through `inbox`; the
    subclass's `_loop` takes what arrived between its steps."""

    thread_name = "worker"

    def __init__(self) -> None:
        self.inbox: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None
        self.guard = threading.Lock()

    def submit(self, job: Any) -> None:
        with self.guard:
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
                self.thread.start()
        self.inbox.put(job)

    @property
    def alive(self) -> bool:
        return self.thread is None or self.thread.is_alive()

    def _loop(self) -> None:
        raise NotImplementedError


class DecodeWorker(InboxWorker):
    """The Thinker's continuous batching: one thread that prefills arriving greedy requests,
    admits them into the running `ContinuousDecoder` batch between chunks of steps, and hands
    each result back as soon as its sequence ends. A new request never waits for a running
    batch to finish; it waits at most one chunk (8 steps). The model is used under the
    replica's engine lock, chunk by chunk, so image prefills interleave with decoding.
    Requests that do not fit the decoder's rows decode on their own (`fallback`)."""

    thread_name = "thinker-decode"

    def __init__(self, pipeline: LocalPipeline, lock: EngineLock, slots: int, width: int,
                 fallback: Callable[[list[TextJob]], list[GenerationResult | Exception]]) -> None:
        self.pipeline, self.lock, self.fallback = pipeline, lock, fallback
        self.slots, self.width = slots, width
        self.decoder: ContinuousDecoder | None = None
        super().__init__()

    def _admit(self, jobs: list[TextJob]) -> None:
        """Prefill arrivals together and admit those that fit; the others decode on their own.
        `understanding_contexts` prefills the plain prompts in one forward, so a burst of
        arrivals stalls the running batch for about one prefill, not one each. When a group's
        prefill fails, its jobs are tried again one by one, so that a bad request fails alone."""
        live = []
        for job in jobs:
            if job.cancel.is_set():
                job.deliver(Cancelled("understand: cancelled before it started"))
            else:
                live.append(job)
        if not live:
            return
        misfits = []
        with self.lock.hold():
            try:
                if self.decoder is None:
                    self.decoder = ContinuousDecoder(self.pipeline.thinker_engine, self.slots, self.width)
                started = time.perf_counter()
                contexts = self.pipeline.understanding_contexts([job.req for job in live])
            except BaseException as exc:  # nothing was admitted yet
                failed: BaseException | None = exc
            else:
                failed = None
                for job, ctx in zip(live, contexts):
                    job.prefilled_s = started
                    if self.decoder.fits(ctx, job.req.max_tokens):
                        self.decoder.admit(job, ctx, job.req.max_tokens)
                    else:
                        misfits.append(job)
        if failed is not None:
            if len(live) == 1:
                live[0].deliver(_understand_error(failed))
            else:
                for job in live:
                    self._admit([job])
            return
        for job in misfits:
            try:
                job.deliver(self.fallback([job])[0])
            except BaseException as exc:  # a bad request fails alone
                job.deliver(_understand_error(exc))

    def _finish(self, seq) -> None:
        job: TextJob = seq.key
        tok = self.pipeline.thinker_engine.tokenizer
        now = time.perf_counter()
        req = job.req
        job.deliver(GenerationResult(
            req.modality, req.prompt, req.seed, text=clean_generated_text(tok.decode([tok.bos_id] + seq.token_ids)),
            token_ids=seq.token_ids, finish_reason="stop" if seq.stopped_on_eos else "length",
            timings={"queue_and_prefill_s": job.prefilled_s - job.started, "decode_s": now - job.prefilled_s,
                     "tokens": float(len(seq.token_ids))},
        ))

    def _loop(self) -> None:
        waiting: list[TextJob] = []
        while True:
            decoder = self.decoder
            busy = decoder is not None and decoder.free_slots < decoder.slots
            try:
                # block only when nothing is decoding
                waiting.append(self.inbox.get(block=not busy and not waiting, timeout=None))
                while True:
                    waiting.append(self.inbox.get_nowait())
            except queue.Empty:
                pass
            while waiting and (self.decoder is None or self.decoder.free_slots):
                free = self.slots if self.decoder is None else self.decoder.free_slots
                group, waiting = waiting[:free], waiting[free:]
                self._admit(group)
            decoder = self.decoder
            if decoder is None or decoder.free_slots == decoder.slots:
                continue
            for seq in list(decoder.active):
                if seq is not None and seq.key.cancel.is_set():
                    decoder.cancel(seq.key)
                    seq.key.deliver(Cancelled("understand: cancelled"))
            try:
                with self.lock.hold():
                    finished = decoder.run() if decoder.free_slots < decoder.slots else []
            except torch.cuda.OutOfMemoryError as exc:
                error = out_of_memory("understand", exc)
                for seq in decoder.active:
                    if seq is not None:
                        seq.key.deliver(error)
                self.decoder = None  # rebuilt (and its cache reallocated) for the next request
                continue
            for seq in finished:
                self._finish(seq)


@dataclass(eq=False)
class ImageJob:
    """An image request on its way through the DiT's batch: its contexts (None: built on this
    replica), the flag its caller sets when it goes away, and the queue its progress events
    (when asked for) and then its result or error go to, on the caller's event loop."""

    req: GenerationRequest
    prepared: PreparedImage | None
    progress: bool
    loop: asyncio.AbstractEventLoop
    items: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    queued: float = 0.0  # when its denoising job joined the batch's queue
    began: bool = False
    batch: int = 0  # the most jobs it was denoised with (itself included)

    def begin(self) -> None:
        """Its work starts (its contexts built here, or its first step): record the wait."""
        if not self.began:
            self.began = True
            metrics.observe_queue_wait(time.perf_counter() - self.submitted)

    def send(self, item: dict | GenerationResult | BaseException) -> None:
        """From the worker thread. A caller whose loop is gone is not listening: its work stops."""
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, item)
        except RuntimeError:
            self.cancel.set()


class DenoiseWorker(InboxWorker):
    """The DiT's cross-request batching: one thread that takes arriving image requests (and
    builds their contexts when the replica makes them itself), steps the running
    `BatchDenoiser` batch one denoising step at a time under the engine lock, and VAE-decodes
    and hands back each request as soon as its job ends. A new request joins a running batch
    of its size at the next step; requests of other sizes take turns (see `dit_batch`).

    Failures stay with their request: a cancelled caller's job ends at its next step, a bad
    request or a failed decode fails alone, and a step that runs out of memory (or fails) is
    retried with half the batch, down to the one job that fails on its own (507 for memory)."""

    thread_name = "dit-denoise"

    def __init__(self, pipeline: LocalPipeline, lock: EngineLock, max_batch_size: int) -> None:
        self.pipeline, self.lock = pipeline, lock
        self.batch = BatchDenoiser(pipeline.dit, max_batch_size)
        self.plans_waiting = 0  # attention shapes on flash until this thread builds their plans
        self.plans_built = 0
        super().__init__()

    def _fail(self, job: ImageJob, exc: BaseException) -> None:
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            exc = out_of_memory("render", exc)
        elif isinstance(exc, Cancelled):
            log.info("render: cancelled; its work stopped (%s)", exc)
        job.send(exc)

    def _start(self, job: ImageJob) -> None:
        """Contexts (when this replica builds them) and the denoising job, queued for a batch."""
        if job.cancel.is_set():
            raise Cancelled("render: cancelled before it started")
        if job.prepared is None:
            with self.lock.hold(observe=False):
                job.begin()
                job.prepared = self.pipeline.prepare_image(job.req, job.cancel.is_set)

        def on_step(record: StepRecord) -> None:  # in the batch's step, for each of its jobs
            metrics.count_step()
            job.begin()
            job.batch = max(job.batch, record.batch)
            if job.progress:
                job.send({"step": record.index + 1, "total": record.total, "t": record.t})

        prepared = job.prepared
        job.queued = time.perf_counter()
        self.batch.submit(self.pipeline.dit.job(prepared.contexts, job.req.sampler(), prepared.noise, on_step,
                                                job.cancel.is_set, key=job))

    def _finish(self, done: DenoiseJob) -> None:
        job: ImageJob = done.key
        if done.error is not None:
            self._fail(job, done.error)
            return
        try:
            denoise_s = time.perf_counter() - job.queued  # waiting for a place in a batch included
            with self.lock.hold(observe=False):
                result = self.pipeline.finish_image(job.req, job.prepared, done.x,
                                                    {"denoise_s": denoise_s, "denoise_batch": float(job.batch)})
                # The result leaves this process: a CUDA tensor in it would make every caller
                # (an ingress on a node without a GPU, say) start CUDA to unpickle it, or fail.
                result.latent_tokens = result.latent_tokens.cpu()
        except Exception as exc:  # the decode of this request failed: it alone
            self._fail(job, exc)
            return
        job.send(result)

    def _step(self) -> None:
        with self.lock.hold(observe=False):
            ended = self.batch.step_or_back_off()
        self.plans_waiting = attention.plans_pending()
        for done in ended:
            self._finish(done)

    def _loop(self) -> None:
        # A prompt length this replica has not denoised yet would cost its request a cuDNN
        # attention plan (80-90 ms at 512²): such shapes run on flash, and their plans are
        # built here between requests (`attention.defer_plans`).
        attention.defer_plans()
        while True:
            arrived: list[ImageJob] = []
            try:
                # block only when nothing is denoising or waiting for a batch, or for a plan
                arrived.append(self.inbox.get(block=self.batch.idle and not attention.plans_pending()))
                while True:
                    arrived.append(self.inbox.get_nowait())
            except queue.Empty:
                pass
            if not arrived and self.batch.idle:  # idle, with plans to build: one at a time
                try:
                    with self.lock.hold(observe=False):
                        self.plans_built += attention.build_plan()
                except Exception:  # the shape stays on flash; its next request asks again
                    log.exception("building an attention plan failed")
                self.plans_waiting = attention.plans_pending()
                continue
            for job in arrived:
                try:
                    self._start(job)
                except Exception as exc:  # a bad or cancelled request fails alone
                    self._fail(job, exc)
            if self.batch.idle:
                continue
            try:
                self._step()
            except Exception as exc:  # a fault of this loop's own bookkeeping: no request may hang on it
                log.exception("the denoising worker failed; failing the requests it holds")
                for held in (*self.batch.running, *self.batch.waiting):
                    held.key.send(exc)
                self.batch = BatchDenoiser(self.pipeline.dit, self.batch.max_batch_size)


@serve.deployment(name="Thinker")
class ThinkerServer:
    def __init__(self, app_config: dict) -> None:
        logs_into_serve()
        self.config = AppConfig.model_validate(app_config)
        device, dtype = resolve_device(self.config.thinker)
        t0 = time.perf_counter()
        ckpt = load_checkpoint(self.config.model, thinker_parts(self.config), device, dtype)
        self.pipeline = LocalPipeline(Thinker(ckpt.model, ckpt.tokenizer, ckpt.vae), None)
        self.transport = make_transport(self.config.dit.transport)
        self.lock = EngineLock()
        self.understand_batched.set_max_batch_size(self.config.thinker.max_batch_size)
        self.understand_batched.set_batch_wait_timeout_s(self.config.thinker.batch_wait_timeout_s)
        self.decode_worker = DecodeWorker(self.pipeline, self.lock, self.config.thinker.max_batch_size,
                                          self.config.thinker.max_decode_len, self._understand)
        log.info("Thinker ready in %.1fs on %s (%s), transport %s", time.perf_counter() - t0, device, dtype, self.transport.name)

    def model_info(self) -> ModelInfo:
        cfg = self.pipeline.cfg
        return ModelInfo(cfg.max_image_side, cfg.latent_downsample, self.config.thinker.max_model_len)

    def tokenizer(self) -> BagelTokenizer:
        """The tokenizer, for the driver's prompt-length checks."""
        return self.pipeline.thinker_engine.tokenizer

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def understand_batched(self, jobs: list[TextJob]) -> list[GenerationResult | Exception]:
        return await self.lock.run("understand", lambda _stop: self._understand(jobs))

    def _understand(self, jobs: list[TextJob]) -> list[GenerationResult | Exception]:
        """Decode a batch. On CUDA out-of-memory the batch is split in halves and each is
        retried; a request that runs out of memory alone gets `EngineOutOfMemory`. Requests
        whose callers went away stop with their group and get `Cancelled`."""
        try:
            results = self.pipeline.understand_batch([j.req for j in jobs], lambda i: jobs[i].cancel.is_set())
        except torch.cuda.OutOfMemoryError as exc:
            if len(jobs) == 1:
                return [out_of_memory("understand", exc)]
            release_memory()
            half = len(jobs) // 2
            log.warning("out of accelerator memory decoding a batch of %d; retrying as %d + %d", len(jobs), half, len(jobs) - half)
            return self._understand(jobs[:half]) + self._understand(jobs[half:])
        return [Cancelled("understand: cancelled") if r is None else r for r in results]

    async def understand(self, req: GenerationRequest) -> GenerationResult:
        """text2text / img2text. Greedy requests join the continuous decoding batch; sampled
        ones are decoded together in batches of their own (each with its own generator)."""
        t0 = time.perf_counter()
        job = TextJob(req)
        try:
            if req.do_sample:
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
        def produce(emit, should_stop) -> None:
            for item in self.pipeline.understand_stream(req):
                if should_stop():
                    raise Cancelled("understand_stream: the consumer went away")
                emit(item)

        async for item in self.lock.stream("understand_stream", produce):
            yield item

    async def prepare_image(self, req: GenerationRequest) -> Handoff:
        """Contexts (and think text) of a text2img / img2img request, packed for the DiT."""
        t0 = time.perf_counter()

        def prepare(stop: Callable[[], bool]) -> tuple[PreparedImage, Any]:
            # Sent under the engine lock, in its thread: packing never blocks the event loop,
            # and no other request's CUDA-graph capture runs in this process meanwhile.
            prepared = self.pipeline.prepare_image(req, stop)
            return prepared, self.transport.send(prepared.contexts)

        prepared, payload = await self.lock.run("prepare_image", prepare)
        metrics.observe_stage("thinker", time.perf_counter() - t0)
        return Handoff(payload, prepared.noise, prepared.think_text, prepared.think_token_ids, prepared.timings,
                       ray_peer.node_id())

    def check_health(self) -> None:
        if self.pipeline.thinker is None:
            raise RuntimeError("Thinker engine missing")


@serve.deployment(name="DiT")
class DiTServer:
    def __init__(self, app_config: dict) -> None:
        logs_into_serve()
        self.config = AppConfig.model_validate(app_config)
        device, dtype = resolve_device(self.config.dit)
        t0 = time.perf_counter()
        ckpt = load_checkpoint(self.config.model, dit_parts(self.config), device, dtype)
        thinker = Thinker(ckpt.model, ckpt.tokenizer, ckpt.vae) if self.config.edit_contexts_on == "dit" else None
        self.pipeline = LocalPipeline(thinker, DiT(ckpt.model, ckpt.tokenizer, ckpt.vae))
        self.device = torch.device(device)
        self.transport = make_transport(self.config.dit.transport)
        self.lock = EngineLock()
        batch = self.config.dit.max_batch_size
        self.worker = DenoiseWorker(self.pipeline, self.lock, batch)
        # Contexts received here at once (off the engine lock): a full batch denoising, and
        # the next one arriving meanwhile.
        self.handoff_slots = asyncio.Semaphore(batch + 1)
        log.info("DiT ready in %.1fs on %s (%s), up to %d requests a batch", time.perf_counter() - t0, device, dtype, batch)

    def _received(self, handoff: Handoff) -> PreparedImage:
        contexts, stats = self.transport.receive(handoff.payload, self.device)
        crossed = handoff.node != ray_peer.node_id()
        metrics.observe_handoff(stats, crossed)
        timings = dict(handoff.timings, handoff_bytes=float(stats.nbytes), handoff_send_s=stats.send_s,
                       handoff_receive_s=stats.receive_s, handoff_crossed_nodes=float(crossed),
                       **{f"handoff_via_{stats.route}": 1.0})
        return PreparedImage(contexts, handoff.noise, handoff.think_text, handoff.think_token_ids, timings)

    async def _receive(self, handoff: Handoff | None) -> PreparedImage | None:
        """The handoff's contexts, received in a worker thread outside the engine lock."""
        if handoff is None:
            return None
        try:
            return await asyncio.to_thread(self._received, handoff)
        except torch.cuda.OutOfMemoryError as exc:
            raise out_of_memory("receive", exc) from None

    async def _images(self, req: GenerationRequest, prepared: PreparedImage | None,
                      progress: bool) -> AsyncIterator[dict | GenerationResult]:
        """The request through the denoising batch (its contexts built here when None):
        progress events `{"step", "total", "t"}` when asked for, then the result. When the
        caller goes away (cancelled, or the stream closed) its job stops at the next step."""
        job = ImageJob(req, prepared, progress, asyncio.get_running_loop())
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

    async def _image(self, req: GenerationRequest, prepared: PreparedImage | None) -> GenerationResult:
        async with contextlib.aclosing(self._images(req, prepared, progress=False)) as items:
            async for result in items:
                return result
        raise RuntimeError("the denoising worker ended without a result")  # unreachable: it sends one or an error

    async def render(self, req: GenerationRequest, handoff: Handoff) -> GenerationResult:
        """Denoise and decode over contexts the Thinker prepared."""
        t0 = time.perf_counter()
        async with self.handoff_slots:
            result = await self._image(req, await self._receive(handoff))
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
            prepared = await self._receive(handoff)
            async with contextlib.aclosing(self._images(req, prepared, progress=True)) as items:
                async for item in items:
                    yield item

    def check_health(self) -> None:
        if self.pipeline.dit is None:
            raise RuntimeError("DiT engine missing")
        if not self.worker.alive:
            raise RuntimeError("the DiT's denoising thread has died")

