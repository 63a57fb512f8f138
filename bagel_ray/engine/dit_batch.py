"""Continuous batching of denoising jobs of different requests (cross-request DiT batching).

A DiT forward over a few thousand rows leaves the GPU's GEMMs half empty and reads the whole
und expert (13 GB) for the two marker rows of each block, so a server should step the jobs of
several users together (`DiT.step`), as the Thinker decodes several sequences together
(`continuous.py`). `BatchDenoiser` keeps one running batch of jobs of one latent grid; new
jobs join it at step boundaries, finished ones leave after the step that finishes them, and
each job keeps its own schedule, so jobs at different steps share every forward.

Fairness: jobs of one size run at a time, so sizes take turns in queue order. A waiting job
of the running batch's size joins it at a step boundary (while there is room) unless a job of
another size is ahead of it in the queue; so once another size waits, the batch takes no one
who came after it and drains. Then the job at the head of the queue opens the next batch,
which takes every waiting job of its size (up to the batch limit, in queue order), so that
same-size requests still share batches under mixed traffic. Each batch opened while a job
waits starts with a job queued before it, so every job gets its turn.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Protocol, Sequence

import torch

from bagel_ray.engine.cancel import Cancelled
from bagel_ray.engine.dit import DenoiseJob, DiT

log = logging.getLogger(__name__)


class Stepper(Protocol):
    """What a batch steps: `DiT`, or a parallel replica's group (`serve.dit_group.DiTGroup`,
    the same step over several ranks)."""

    def step(self, jobs: Sequence[DenoiseJob]) -> None: ...


class BatchDenoiser:
    def __init__(self, dit: DiT | Stepper, max_batch_size: int) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.dit = dit
        self.max_batch_size = max_batch_size
        self.limit = max_batch_size  # lowered by `back_off` until the running batch drains
        self.waiting: deque[DenoiseJob] = deque()
        self.running: list[DenoiseJob] = []

    def submit(self, job: DenoiseJob) -> None:
        """Queue a job (made by `DiT.job`); it joins a batch at a later `step`."""
        self.waiting.append(job)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def _drop_cancelled(self) -> list[DenoiseJob]:
        """Waiting jobs whose callers went away end now, without waiting for a batch."""
        gone = [job for job in self.waiting if job.should_stop is not None and job.should_stop()]
        for job in gone:
            self.waiting.remove(job)
            job.error = Cancelled("denoising cancelled before it started")
        return gone

    def _admit(self) -> None:
        opening = not self.running
        if opening:
            self.limit = self.max_batch_size
            if not self.waiting:
                return
        grid = (self.running or self.waiting)[0].grid
        joining = []
        for job in self.waiting:
            if len(self.running) + len(joining) >= self.limit:
                break
            if job.grid == grid:
                joining.append(job)
            elif not opening:
                break  # another size is ahead of the rest: this batch drains first
        for job in joining:
            self.waiting.remove(job)
            self.running.append(job)

    def step(self) -> list[DenoiseJob]:
        """Admit waiting jobs, run one step of the running batch, and return the jobs that
        ended (finished, cancelled, or failed on their own); they have left the batch. When
        the forward raises, the exception propagates and no job has moved: call `back_off`."""
        self._admit()
        ended = []
        if self.running:
            self.dit.step(self.running)
            ended = [job for job in self.running if job.done]
            self.running = [job for job in self.running if not job.done]
        return ended + self._drop_cancelled()

    def step_or_back_off(self) -> list[DenoiseJob]:
        """`step`, and when its forward raises, `back_off` (out of memory: after handing the
        allocator's cached blocks back, for the smaller retry), saying what happens next. The
        loop body of every user of a batch (the Serve DiT worker, the bulk job's DiT stage)."""
        try:
            return self.step()
        except Exception as exc:
            size = len(self.running)
            memory = isinstance(exc, torch.cuda.OutOfMemoryError)
            if memory:
                torch.cuda.empty_cache()
            log.warning("%s denoising a batch of %d (%s: %s); %s", "out of accelerator memory" if memory else "a failure",
                        size, type(exc).__name__, exc, f"retrying with {size // 2}" if size > 1 else "it fails alone",
                        exc_info=not memory)
            return self.back_off(exc)

    def back_off(self, error: BaseException) -> list[DenoiseJob]:
        """The running batch's step raised `error` (out of memory, or a failure of one job's
        inputs). With several jobs left, the earlier-admitted half keeps running and the rest
        go back to the head of the queue, and no more than that half run together until the
        batch drains, so the retry needs less memory and a faulty job ends up alone. A single
        job fails with `error` on its own. Returns the jobs that leave: that one, and any that
        were cancelled during the failed step."""
        ended = [job for job in self.running if job.done]
        running = [job for job in self.running if not job.done]
        if len(running) <= 1:
            for job in running:
                job.error = error
            self.running = []
            return ended + running
        keep = len(running) // 2
        self.limit = keep
        self.waiting.extendleft(reversed(running[keep:]))
        self.running = running[:keep]
        return ended
