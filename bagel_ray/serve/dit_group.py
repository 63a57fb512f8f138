"""A DiT replica that owns several GPUs (or CPUs): the Ray side of `engine/dit_parallel.py`.

The replica's Serve options carry one placement-group bundle per rank (`DiTConfig.serve_options`,
STRICT_PACK: one node). The replica is rank 0, in the first bundle; at start it places N-1
`RankWorker` actors in the other bundles of its own placement group, waits until they have
loaded the model (the parts rank 0 loads), and joins them in a `torch.distributed` group (NCCL on
GPUs, gloo on CPUs) whose rendezvous is on the replica's node.

A request still goes through the replica's `DenoiseWorker`, whose batch is a `GroupBatch`:
one request at a time (no cross-request batching over a group), stepped by rank 0 under the
replica's engine lock while each worker rank runs the whole loop of the same request in one
actor call.

KV contexts: rank 0 receives the whole handoff as on any DiT replica (it holds cond, whose
context is all of gen). A worker rank gets its share (`ParallelDiT.wants`: its branches, and
its heads of cond when it helps cond) from the handoff's own transport where that reaches it
(`share_from`, through `transport/shares.py`): the Thinker of a several-rank DiT stores the
contexts in the object store by reference, in pieces, and each worker gets only the pieces its
branches cover; a handoff over CUDA IPC is mapped by each rank that sees the sender's GPU, and
released by rank 0 once every rank holds its share. Where the transport does not reach the
rank, rank 0 sends it its share over the group (GPU to GPU on NCCL; `deliver_shares`, after
one small all-gather of who holds what): contexts built on rank 0 (img2img with
`edit_contexts_on: dit`), a NCCL handoff (the Thinker's pair communicator has one receiver; a
send to each rank is not built), and the pull-through-the-object-store fallback.

Faults: a worker that dies makes the replica unhealthy (`check_health` pings them), so Serve
replaces the replica and with it the group (the workers are owned by the replica and die
with it). The request in flight fails with `GroupBroken` at the collective that misses the
dead rank (at once on gloo; on NCCL when the collective times out, `dit.parallel.timeout_s`),
later requests fail at once until the replacement is up.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import time
from collections import deque
from typing import Any, Callable

import ray
import torch
import torch.distributed as dist
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from bagel_ray.engine.cancel import Cancelled
from bagel_ray.engine.dit import DenoiseJob, DenoiseParams, DiT
from bagel_ray.engine.dit_parallel import BranchPlan, ParallelConfig, ParallelDiT, ParallelJob
from bagel_ray.engine.kv_context import ImageContexts, KVContext
from bagel_ray.serve import metrics
from bagel_ray.serve.config import AppConfig, ParallelSettings
from bagel_ray.serve.errors import GroupBroken
from bagel_ray.serve.workers import ImageJob
from bagel_ray.transport import ray_peer
from bagel_ray.transport.base import KVTransport, TransferStats
from bagel_ray.transport.shares import fetch_share, portable

log = logging.getLogger("bagel_ray.serve")

PING_TIMEOUT_S = 10.0


def engine_config(settings: ParallelSettings, heads: int, kv_heads: int) -> ParallelConfig:
    """The engine's grid, checked against the model; errors name the key under `dit.`."""
    try:
        config = ParallelConfig(settings.cfg, settings.sequence)
        config.check_heads(heads, kv_heads)
    except ValueError as exc:
        raise ValueError(f"dit.{exc}") from None
    return config


def join_group(dit: DiT, config: ParallelConfig, rank: int, address: str, timeout_s: float) -> ParallelDiT:
    """Join the replica's process group as `rank` and build this rank's engine."""
    backend = "nccl" if dit.model.device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(dit.model.device)
        # Ray shows each rank only its own GPU. NCCL then reaches the peers' GPUs through
        # cuMem handles, and its NVLink SHARP (NVLS) collectives are known to misorder ranks
        # when each process sees different devices (NVIDIA/nccl#1906): keep NVLS off unless
        # the operator chose otherwise. Not yet run on GPUs.
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    dist.init_process_group(backend, init_method=f"tcp://{address}", rank=rank, world_size=config.size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return ParallelDiT(dit, config)


def leave_group() -> None:
    """After a failure mid-request: close this rank's connections, so that the other ranks'
    pending collectives fail now (a dead peer on gloo) rather than at their timeout. The group
    is broken from then on; Serve replaces the replica."""
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - already gone
        log.exception("leaving the DiT group failed")


def share_from(engine: ParallelDiT, plan: BranchPlan, layout: dict[str, tuple[tuple[int, ...], int]],
               handoff: Any | None, timeout_s: float) -> tuple[dict[str, KVContext], TransferStats | None]:
    """A worker rank's contexts of a request: fetched by this rank from the handoff's own
    transport where it reaches this process (`transport.shares`), else (contexts built on rank
    0, a NCCL handoff, a fetch that failed) relayed by rank 0 over the group. Collective with
    rank 0's `deliver_shares`, which waits for it in a collective: a fetch gives up after
    half the group's `timeout_s` and is relayed then. Returns the stats of this rank's own
    fetch (None: relayed)."""
    fetched = None
    if handoff is not None:
        model = engine.dit.model
        try:
            fetched = fetch_share(handoff.payload, engine.wants(plan), model.device, model.dtype, timeout_s / 2)
        except Exception as exc:  # noqa: BLE001 - rank 0 has the contexts: it relays them instead
            log.warning("rank %d could not fetch its KV share (%s: %s); rank 0 relays it", engine.rank,
                        type(exc).__name__, exc)
    engine.holding(fetched is not None)
    if fetched is None:
        return engine.receive_contexts(plan, layout), None
    contexts, stats = fetched
    metrics.observe_handoff(stats, handoff.node != ray_peer.node_id(), engine.rank)
    return contexts, stats


def deliver_shares(engine: ParallelDiT, plan: BranchPlan, contexts: ImageContexts) -> int:
    """Rank 0: the worker ranks that could not fetch their share themselves (`share_from`) get
    it from here over the group. Returns the bytes relayed."""
    holding = engine.holding(True)
    return engine.send_contexts(plan, contexts, [r for r, held in enumerate(holding) if not held])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@ray.remote(max_concurrency=2)  # a ping answers while `denoise` runs
class RankWorker:
    """Rank r >= 1 of a parallel DiT replica, in bundle r of the replica's placement group."""

    def __init__(self, load: Callable[[AppConfig], DiT], app_config: dict, rank: int) -> None:
        self.config = AppConfig.model_validate(app_config)
        self.rank = rank
        self.dit = load(self.config)
        self.engine: ParallelDiT | None = None
        self.last_fetch: TransferStats | None = None  # this rank's own fetch of the last request's contexts

    def ping(self) -> int:
        return self.rank

    def join(self, address: str) -> int:
        llm = self.dit.cfg.llm
        settings = self.config.dit.parallel
        config = engine_config(settings, llm.num_attention_heads, llm.num_key_value_heads)
        self.engine = join_group(self.dit, config, self.rank, address, settings.timeout_s)
        return self.rank

    def denoise(self, plan: BranchPlan, layout: dict[str, tuple[tuple[int, ...], int]], height: int, width: int,
                params: DenoiseParams, noise: torch.Tensor, handoff: Any | None = None) -> str:
        """This rank's part of one request, start to end, in step with rank 0: its branches'
        contexts (from the handoff, or from rank 0: `share_from`), then the denoising loop."""
        try:
            mine, self.last_fetch = share_from(self.engine, plan, layout, handoff, self.config.dit.parallel.timeout_s)
            self.engine.denoise(plan, mine, height, width, params, noise)
        except Cancelled:
            return "cancelled"
        except BaseException:
            log.exception("rank %d failed mid-request", self.rank)  # rank 0 reports its own failure, or this one's
            leave_group()  # the others fail at their next collective instead of waiting it out
            raise
        return "done"


class DiTGroup:
    """Rank 0's view of its group: the worker actors, the engine, and whether the group still
    works."""

    def __init__(self, dit: DiT, app: AppConfig, raw_config: dict, load: Callable[[AppConfig], DiT],
                 transport: KVTransport | None = None) -> None:
        """`load`: what a worker rank runs to load its `DiT` (the stage decides, as for rank 0).
        `transport`: the replica's, told when every rank holds its share of a handoff."""
        self.transport = transport
        self.relayed_bytes = 0  # context bytes rank 0 sent the worker ranks over the group
        settings = app.dit.parallel
        llm = dit.cfg.llm
        self.config = engine_config(settings, llm.num_attention_heads, llm.num_key_value_heads)
        self.settings = settings
        pg = get_current_placement_group()
        bundles = pg.bundle_specs if pg is not None else []
        if len(bundles) < self.config.size:
            raise ValueError(f"dit.parallel: cfg {settings.cfg} x sequence {settings.sequence} = {self.config.size} ranks, "
                             f"but this replica's placement group has {len(bundles)} bundle(s); deploy it through "
                             f"build_app, which gives it one bundle per rank")
        self.broken: str | None = None
        self.workers = []
        for rank in range(1, self.config.size):
            bundle = dict(bundles[rank])
            options: dict[str, Any] = {"num_cpus": bundle.pop("CPU", 0), "num_gpus": bundle.pop("GPU", 0)}
            if "memory" in bundle:
                options["memory"] = bundle.pop("memory")
            strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank)
            self.workers.append(RankWorker.options(scheduling_strategy=strategy, resources=bundle, **options)
                                .remote(load, raw_config, rank))
        t0 = time.perf_counter()
        ray.get([w.ping.remote() for w in self.workers], timeout=settings.start_timeout_s)  # loaded
        address = f"{ray.util.get_node_ip_address()}:{_free_port()}"
        joined = [w.join.remote(address) for w in self.workers]
        self.engine = join_group(dit, self.config, 0, address, settings.timeout_s)
        ray.get(joined, timeout=settings.timeout_s)
        log.info("DiT group of %d ranks (cfg %d x sequence %d) joined in %.1fs", self.config.size, settings.cfg,
                 settings.sequence, time.perf_counter() - t0)

    def check_health(self) -> None:
        """Raises when a worker rank is dead or does not answer (Serve then replaces the replica)."""
        if self.broken is None:
            try:
                ray.get([w.ping.remote() for w in self.workers], timeout=PING_TIMEOUT_S)
            except (RayActorError, GetTimeoutError) as exc:
                self.broken = f"a worker rank is gone ({type(exc).__name__})"
        if self.broken is not None:
            raise GroupBroken(f"the DiT replica's process group is broken: {self.broken}")

    def start(self, job: DenoiseJob) -> tuple[ParallelJob, list]:
        """Rank 0's share of a request, and the worker ranks' calls running the rest."""
        self.check_health()
        contexts, params = job.contexts, job.params
        plan = BranchPlan.of(contexts, params, self.config.cfg)
        # checked here first: a request rank 0 refuses must not set the workers going
        ours = self.engine.job(plan, self.engine.share(plan, contexts), contexts.height, contexts.width, params, job.x,
                               job.on_step, job.should_stop)
        layout, noise = self.engine.context_layout(plan, contexts), job.x.cpu()
        handoff = job.key.handoff if isinstance(job.key, ImageJob) else None  # None: contexts built here
        if handoff is not None and not portable(handoff.payload):
            handoff = None  # its tensors would travel to the workers whole: rank 0 sends them their shares
        calls = [worker.denoise.remote(plan, layout, contexts.height, contexts.width, params, noise, handoff)
                 for worker in self.workers]
        try:
            self.relayed_bytes += deliver_shares(self.engine, plan, contexts)
            if handoff is not None and self.transport is not None:
                self.transport.release(handoff.payload)
        except Exception as exc:  # noqa: BLE001 - a rank is gone: settle breaks the group
            self.settle(calls, exc)
            raise
        return ours, calls

    def settle(self, calls: list, failure: BaseException | None) -> None:
        """After rank 0's loop: the workers must have ended the same request. `failure`: what
        rank 0's step raised (its forward or a collective); the other ranks wait in a
        collective for it then, so rank 0 leaves the group at once, which fails them too. A
        failed or silent worker, or such a failure, breaks the group."""
        if failure is not None and self.broken is None:
            self.broken = f"rank 0 failed mid-request ({_first_line(failure)})"
            leave_group()
        ready, pending = ray.wait(calls, num_returns=len(calls), timeout=self.settings.timeout_s)
        problem = self.broken or (f"{len(pending)} worker rank(s) did not end the request" if pending else None)
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - any failure of a rank breaks the group
                problem = problem or f"a worker rank failed ({_first_line(exc)})"
        if problem is not None:
            if self.broken is None:
                self.broken = problem
                leave_group()
            log.error("DiT group broken: %s", problem)
            raise GroupBroken(f"the DiT replica's process group is broken: {problem}; Serve replaces the replica") from failure


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


class GroupBatch:
    """`BatchDenoiser`'s interface (what `DenoiseWorker` steps) over a `DiTGroup`: one job at a
    time over all ranks, one step a call."""

    max_batch_size = 1

    def __init__(self, group: DiTGroup) -> None:
        self.group = group
        self.waiting: deque[DenoiseJob] = deque()
        self.running: list[DenoiseJob] = []
        self._ours: ParallelJob | None = None
        self._calls: list = []

    def submit(self, job: DenoiseJob) -> None:
        self.waiting.append(job)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def _end(self, job: DenoiseJob, failure: BaseException | None) -> None:
        ours = self._ours
        self.running, self._ours = [], None
        job.x, job.index = ours.x, ours.index
        job.error = failure or ours.error
        try:
            self.group.settle(self._calls, failure)
        except GroupBroken as exc:
            job.error = exc

    def step_or_back_off(self) -> list[DenoiseJob]:
        """One step of the running job (starting the next one first when none runs); returns
        the jobs that ended. A broken group fails every job it is handed."""
        ended = []
        for job in list(self.waiting):
            if job.should_stop is not None and job.should_stop():
                self.waiting.remove(job)
                job.error = Cancelled("denoising cancelled before it started")
                ended.append(job)
        if not self.running and self.waiting:
            job = self.waiting.popleft()
            try:
                self._ours, self._calls = self.group.start(job)
                self.running = [job]
            except Exception as exc:  # a dead rank, or a bad request: it fails alone
                job.error = exc
                return ended + [job]
        if not self.running:
            return ended
        job = self.running[0]
        try:
            self.group.engine.step(self._ours)
        except Exception as exc:  # noqa: BLE001 - the collective or the forward failed: settle decides
            self._end(job, exc)
            return ended + [job]
        job.index = self._ours.index
        if self._ours.done:
            self._end(job, None)
            ended.append(job)
        return ended
