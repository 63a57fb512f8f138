"""The Ray-free half of the stage replicas: the engine lock, the batching workers and the
out-of-memory policy. The deployments (`stages.py`) only wire these to Serve; everything
here runs and is tested in a plain process.

Both stages batch requests of different users step by step: the Thinker decodes greedy text
requests in one continuous batch (`DecodeWorker`), the DiT denoises image requests of the
same size together (`DenoiseWorker`). A call whose caller goes away (deadline, client
disconnect) stops at the engine's next step. CUDA out-of-memory fails only the request that
caused it (`EngineOutOfMemory`; a batch is first split and retried), and the replica keeps
serving.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator

import torch

from bagel_ray.engine.cancel import Cancelled
from bagel_ray.engine.decoder import ContinuousDecoder
from bagel_ray.engine.dit import DenoiseJob, StepRecord
from bagel_ray.engine.dit_batch import BatchDenoiser
from bagel_ray.engine.errors import EngineOutOfMemory, PromptTooLong
from bagel_ray.engine.pipeline import LocalPipeline, PreparedImage
from bagel_ray.engine.request import GenerationRequest, GenerationResult, preview_steps
from bagel_ray.model import attention
from bagel_ray.model.tokenizer import clean_generated_text
from bagel_ray.serve import metrics

log = logging.getLogger("bagel_ray.serve.workers")

def release_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def out_of_memory(what: str, exc: BaseException) -> EngineOutOfMemory:
    release_memory()
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    log.warning("out of accelerator memory in %s: %s", what, first_line)
    return EngineOutOfMemory(f"{what} ran out of accelerator memory ({first_line}); try a smaller size or fewer tokens")


def understand_error(exc: BaseException) -> BaseException:
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
    prompt: list[int] | None = None  # its prompt's tokens, made (and checked) off the engine lock
    started: float = field(default_factory=time.perf_counter)
    prefilled_s: float = 0.0
    prompt_tokens: int | None = None  # its context's length, once prefilled

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
                continue
            try:  # tokenized and checked before the engine lock: a long prompt holds no one up
                job.prompt = self.pipeline.prompt_tokens(job.req)
            except PromptTooLong as exc:
                job.deliver(exc)
                continue
            live.append(job)
        if not live:
            return
        misfits = []
        with self.lock.hold():
            try:
                if self.decoder is None:
                    self.decoder = ContinuousDecoder(self.pipeline.thinker_engine, self.slots, self.width)
                started = time.perf_counter()
                contexts = self.pipeline.understanding_contexts([job.req for job in live], [job.prompt for job in live])
            except BaseException as exc:  # nothing was admitted yet
                failed: BaseException | None = exc
            else:
                failed = None
                for job, ctx in zip(live, contexts):
                    job.prefilled_s = started
                    job.prompt_tokens = ctx.length
                    if self.decoder.fits(ctx, job.req.max_tokens):
                        self.decoder.admit(job, ctx, job.req.max_tokens)
                    else:
                        misfits.append(job)
        if failed is not None:
            if len(live) == 1:
                live[0].deliver(understand_error(failed))
            else:
                for job in live:
                    self._admit([job])
            return
        for job in misfits:
            try:
                job.deliver(self.fallback([job])[0])
            except BaseException as exc:  # a bad request fails alone
                job.deliver(understand_error(exc))

    def _finish(self, seq) -> None:
        job: TextJob = seq.key
        tok = self.pipeline.thinker_engine.tokenizer
        now = time.perf_counter()
        req = job.req
        job.deliver(GenerationResult(
            req.modality, req.prompt, req.seed, text=clean_generated_text(tok.decode([tok.bos_id] + seq.token_ids)),
            token_ids=seq.token_ids, finish_reason="stop" if seq.stopped_on_eos else "length", prompt_tokens=job.prompt_tokens,
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
    handoff: Any = None  # the stages.Handoff its contexts came in (a parallel replica's ranks fetch from it)

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

    def __init__(self, pipeline: LocalPipeline, lock: EngineLock, max_batch_size: int,
                 new_batch: Callable[[], Any] | None = None) -> None:
        self.pipeline, self.lock = pipeline, lock
        # `new_batch`: another batch with BatchDenoiser's interface (dit_group.GroupBatch)
        self.new_batch = new_batch or (lambda: BatchDenoiser(pipeline.dit, max_batch_size))
        self.batch = self.new_batch()
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
            prompt = self.pipeline.prompt_tokens(job.req)  # checked before the engine lock
            with self.lock.hold(observe=False):
                job.begin()
                job.prepared = self.pipeline.prepare_image(job.req, job.cancel.is_set, prompt)

        prepared = job.prepared
        previews: frozenset[int] | None = None

        def on_step(record: StepRecord) -> None:  # in the batch's step, for each of its jobs
            nonlocal previews
            metrics.count_step()
            job.begin()
            job.batch = max(job.batch, record.batch)
            if job.progress:
                event: dict = {"step": record.index + 1, "total": record.total, "t": record.t}
                if previews is None:
                    previews = preview_steps(record.total, job.req.partial_images)
                if record.index in previews:  # decoded here, under the lock the step holds
                    event["partial_image"] = self.pipeline.preview(prepared, record)
                job.send(event)

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
                # The result leaves this process: its latents only for a caller that asked
                # (not the HTTP API), on the host (a CUDA tensor in it would make the caller
                # start CUDA to unpickle it, or fail, on a node without a GPU).
                result.latent_tokens = result.latent_tokens.cpu() if job.req.return_latents else None
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
                self.batch = self.new_batch()


def understand_jobs(pipeline: LocalPipeline, jobs: list[TextJob]) -> list[GenerationResult | Exception]:
    """Decode a batch of text jobs together. On CUDA out-of-memory the batch is split in
    halves and each is retried; a request that runs out of memory alone gets
    `EngineOutOfMemory`. Requests whose callers went away stop with their group and get
    `Cancelled`."""
    try:
        prompts = [j.prompt for j in jobs]
        results = pipeline.understand_batch([j.req for j in jobs], lambda i: jobs[i].cancel.is_set(),
                                            None if None in prompts else prompts)
    except torch.cuda.OutOfMemoryError as exc:
        if len(jobs) == 1:
            return [out_of_memory("understand", exc)]
        release_memory()
        half = len(jobs) // 2
        log.warning("out of accelerator memory decoding a batch of %d; retrying as %d + %d", len(jobs), half, len(jobs) - half)
        return understand_jobs(pipeline, jobs[:half]) + understand_jobs(pipeline, jobs[half:])
    return [Cancelled("understand: cancelled") if r is None else r for r in results]
