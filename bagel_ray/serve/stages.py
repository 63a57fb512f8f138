"""The two GPU stages as Ray Serve deployments: thin shells around the engines.

`ThinkerServer` holds the understanding side (text answers, think text, the KV contexts of
image requests); `DiTServer` holds the denoiser and the VAE. They validate nothing about
the model and do no tensor math: they load the engines, call them one request at a time
(one lock per replica), and map results. KV contexts leave the Thinker through the
configured transport and reach the DiT without passing through the driver.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from ray import serve

from bagel_ray.engine.dit import DiT
from bagel_ray.engine.pipeline import DTYPES, LocalPipeline, PreparedImage
from bagel_ray.engine.request import GenerationRequest, GenerationResult
from bagel_ray.engine.thinker import Thinker
from bagel_ray.model.bagel import ALL_PARTS, THINKER_PARTS
from bagel_ray.model.loader import load_checkpoint
from bagel_ray.serve import metrics
from bagel_ray.serve.config import AppConfig, StageConfig
from bagel_ray.transport.base import make_transport

log = logging.getLogger("bagel_ray.serve")

EDIT_PARTS = frozenset({"gen", "gen_heads", "vae"})
DIT_ONLY_PARTS = frozenset({"und", "gen", "gen_heads", "vae"})


@dataclass
class Handoff:
    """What the Thinker returns for an image request: the packed contexts (a transport
    payload) plus the initial noise and the think text."""

    payload: Any
    noise: torch.Tensor
    think_text: str | None
    think_token_ids: list[int] | None
    timings: dict[str, float] = field(default_factory=dict)


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
    return THINKER_PARTS | EDIT_PARTS if app.edit_contexts_on == "thinker" else THINKER_PARTS


def dit_parts(app: AppConfig) -> frozenset[str]:
    return ALL_PARTS if app.edit_contexts_on == "dit" else DIT_ONLY_PARTS


class EngineLock:
    """One request at a time per replica on the model; waiting happens off the event loop
    and is recorded as queue wait."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    @contextmanager
    def hold(self) -> Iterator[None]:
        t0 = time.perf_counter()
        with self._lock:
            metrics.observe_queue_wait(time.perf_counter() - t0)
            yield

    async def run(self, fn, *args):
        def locked():
            with self.hold():
                return fn(*args)

        return await asyncio.to_thread(locked)


@serve.deployment(name="Thinker")
class ThinkerServer:
    def __init__(self, app_config: dict) -> None:
        self.config = AppConfig.model_validate(app_config)
        device, dtype = resolve_device(self.config.thinker)
        t0 = time.perf_counter()
        ckpt = load_checkpoint(self.config.model, thinker_parts(self.config), device, dtype)
        self.pipeline = LocalPipeline(Thinker(ckpt.model, ckpt.tokenizer, ckpt.vae), None)
        self.transport = make_transport(self.config.dit.transport)
        self.lock = EngineLock()
        self.understand_batched.set_max_batch_size(self.config.thinker.max_batch_size)
        self.understand_batched.set_batch_wait_timeout_s(self.config.thinker.batch_wait_timeout_s)
        log.info("Thinker ready in %.1fs on %s (%s), transport %s", time.perf_counter() - t0, device, dtype, self.transport.name)

    def model_info(self) -> ModelInfo:
        cfg = self.pipeline.cfg
        return ModelInfo(cfg.max_image_side, cfg.latent_downsample, self.config.thinker.max_model_len)

    def count_tokens(self, text: str) -> int:
        return len(self.pipeline.thinker_engine.tokenizer.encode(text))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def understand_batched(self, reqs: list[GenerationRequest]) -> list[GenerationResult]:
        return await self.lock.run(self.pipeline.understand_batch, reqs)

    async def understand(self, req: GenerationRequest) -> GenerationResult:
        """text2text / img2text; concurrent calls are decoded together in batches."""
        t0 = time.perf_counter()
        result = await self.understand_batched(req)
        metrics.observe_stage("thinker", time.perf_counter() - t0)
        return result

    def understand_stream(self, req: GenerationRequest) -> Iterator[str | GenerationResult]:
        """Text deltas, then the result (streaming bypasses batching)."""
        with self.lock.hold():
            yield from self.pipeline.understand_stream(req)

    async def prepare_image(self, req: GenerationRequest) -> Handoff:
        """Contexts (and think text) of a text2img / img2img request, packed for the DiT."""
        t0 = time.perf_counter()
        prepared: PreparedImage = await self.lock.run(self.pipeline.prepare_image, req)
        payload = self.transport.send(prepared.contexts)
        metrics.observe_stage("thinker", time.perf_counter() - t0)
        return Handoff(payload, prepared.noise, prepared.think_text, prepared.think_token_ids, prepared.timings)

    def check_health(self) -> None:
        if self.pipeline.thinker is None:
            raise RuntimeError("Thinker engine missing")


@serve.deployment(name="DiT")
class DiTServer:
    def __init__(self, app_config: dict) -> None:
        self.config = AppConfig.model_validate(app_config)
        device, dtype = resolve_device(self.config.dit)
        t0 = time.perf_counter()
        ckpt = load_checkpoint(self.config.model, dit_parts(self.config), device, dtype)
        thinker = Thinker(ckpt.model, ckpt.tokenizer, ckpt.vae) if self.config.edit_contexts_on == "dit" else None
        self.pipeline = LocalPipeline(thinker, DiT(ckpt.model, ckpt.tokenizer, ckpt.vae))
        self.device = torch.device(device)
        self.transport = make_transport(self.config.dit.transport)
        self.lock = EngineLock()
        log.info("DiT ready in %.1fs on %s (%s)", time.perf_counter() - t0, device, dtype)

    def _received(self, handoff: Handoff) -> PreparedImage:
        contexts, stats = self.transport.receive(handoff.payload, self.device)
        metrics.observe_handoff(stats)
        timings = dict(handoff.timings, handoff_bytes=float(stats.nbytes), handoff_send_s=stats.send_s,
                       handoff_receive_s=stats.receive_s)
        return PreparedImage(contexts, handoff.noise, handoff.think_text, handoff.think_token_ids, timings)

    def _render(self, req: GenerationRequest, prepared: PreparedImage, on_step=None) -> GenerationResult:
        def step(record) -> None:
            metrics.count_step()
            if on_step is not None:
                on_step(record)

        return self.pipeline.render(req, prepared, step)

    async def render(self, req: GenerationRequest, handoff: Handoff) -> GenerationResult:
        """Denoise and decode over contexts the Thinker prepared."""
        t0 = time.perf_counter()
        result = await self.lock.run(lambda: self._render(req, self._received(handoff)))
        metrics.observe_stage("dit", time.perf_counter() - t0)
        return result

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        """A whole image request on this replica (img2img when the DiT builds edit contexts)."""
        t0 = time.perf_counter()
        result = await self.lock.run(self.pipeline.run, req)
        metrics.observe_stage("dit", time.perf_counter() - t0)
        return result

    def render_stream(self, req: GenerationRequest, handoff: Handoff | None) -> Iterator[dict | GenerationResult]:
        """Progress events `{"step", "total", "t"}` while denoising, then the result.
        With no handoff the request runs whole on this replica."""
        events: queue.Queue = queue.Queue()

        def work() -> None:
            try:
                with self.lock.hold():
                    prepared = self.pipeline.prepare_image(req) if handoff is None else self._received(handoff)
                    on_step = lambda r: events.put({"step": r.index + 1, "total": r.total, "t": r.t})  # noqa: E731
                    events.put(self._render(req, prepared, on_step))
            except BaseException as exc:  # handed to the consumer, which re-raises it
                events.put(exc)

        threading.Thread(target=work, daemon=True).start()
        while True:
            item = events.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, GenerationResult):
                return

    def check_health(self) -> None:
        if self.pipeline.dit is None:
            raise RuntimeError("DiT engine missing")

