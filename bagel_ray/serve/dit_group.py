"""A DiT replica that owns several GPUs (or CPUs): the Ray side of `engine/dit_parallel.py`.

The replica's Serve options carry one placement-group bundle per rank (`DiTConfig.serve_options`,
STRICT_PACK: one node). The replica is rank 0, in the first bundle; at start it places N-1
`RankWorker` actors in the other bundles of its own placement group, waits until they have
loaded the model (the parts rank 0 loads), and joins them in a `torch.distributed` group (NCCL on
GPUs, gloo on CPUs) whose rendezvous is on the replica's node.

Requests still go through the replica's `DenoiseWorker`, whose batch is a `GroupBatch`: a
`BatchDenoiser` (the one-GPU batch's joining, leaving and fairness rules) over the group, so
several requests of one latent grid are denoised together, joining and leaving at step
boundaries, each with its own schedule, branches, TaylorSeer state, cancellation and `on_step`.
Rank 0 steps the batch under the replica's engine lock (`DiTGroup.step`: one batched
`ParallelDiT.step` over every rank). The worker ranks follow it step by step: while the batch
runs, each runs one long actor call (`RankWorker.follow`) that takes, before every step, a
small control message rank 0 broadcasts over a gloo side group (`Control`: the jobs joining,
with their plan, context layout, size, params and noise, and the order of the step's jobs),
then runs the same step; a job leaves on every rank alike when it ends (the step's gather tells
every rank of rank 0's cancellations). When the batch drains, rank 0 ends the calls and checks
them.

KV contexts: rank 0 receives the whole handoff as on any DiT replica (it holds cond, whose
context is all of gen), and a GPU-direct sender keeps it for the other ranks until rank 0
releases it. A worker rank gets its share of a joining job (`ParallelDiT.wants`: its branches,
and its heads of cond when it helps cond) from the handoff's own transport where that reaches
it (`share_from`, through `transport/shares.py`, with a transport of its own of the replica's
kind): the Thinker of a several-rank DiT on the CPU stores the contexts in the object store by
reference, in pieces, and each worker gets only the pieces its branches cover; a GPU handoff is
mapped over CUDA IPC by each rank that sees the sender's GPU, and pulled piece by piece over a
NCCL pair of the rank's own with the Thinker by each rank on another GPU. The handoff reaches
each worker as an actor call's argument (`RankWorker.offer`), so that Ray tracks the refs in it,
not in the control message. Rank 0 releases it once every rank holds its share. Where the
transport does not reach the rank, rank 0 sends it its share over the group (GPU to GPU on
NCCL; `deliver_shares`, after one small all-gather of who holds what): contexts built on rank 0
(img2img with `edit_contexts_on: dit`), the pull-through-the-object-store fallback, and a
rank's pull that failed.

Faults: a worker that dies makes the replica unhealthy (`check_health` pings them), so Serve
replaces the replica and with it the group (the workers are owned by the replica and die
with it). The request in flight fails with `GroupBroken` at the collective that misses the
dead rank (at once on gloo; on NCCL when the collective times out, `dit.parallel.timeout_s`),
and with it every request of the batch; later requests fail at once until the replacement is up.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import ray
import torch
import torch.distributed as dist
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from bagel_ray.engine.dit import DenoiseJob, DenoiseParams, DiT
from bagel_ray.engine.dit_batch import BatchDenoiser
from bagel_ray.engine.dit_parallel import BranchPlan, ParallelConfig, ParallelDiT, ParallelJob
from bagel_ray.engine.kv_context import ImageContexts, KVContext
from bagel_ray.serve import metrics
from bagel_ray.serve.config import AppConfig, ParallelSettings
from bagel_ray.serve.errors import GroupBroken
from bagel_ray.serve.workers import ImageJob
from bagel_ray.transport import ray_peer
from bagel_ray.transport.base import KVTransport, TransferStats, make_transport
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


def join_group(dit: DiT, config: ParallelConfig, rank: int, address: str,
               settings: ParallelSettings) -> tuple[ParallelDiT, Control]:
    """Join the replica's process group as `rank`: this rank's engine, and the control channel."""
    backend = "nccl" if dit.model.device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(dit.model.device)
        # Ray shows each rank only its own GPU. NCCL then reaches the peers' GPUs through
        # cuMem handles, and its NVLink SHARP (NVLS) collectives are known to misorder ranks
        # when each process sees different devices (NVIDIA/nccl#1906): keep NVLS off unless
        # the operator chose otherwise. Not yet run on GPUs.
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    timeout = datetime.timedelta(seconds=settings.timeout_s)
    dist.init_process_group(backend, init_method=f"tcp://{address}", rank=rank, world_size=config.size, timeout=timeout)
    engine = ParallelDiT(dit, config, cuda_graphs=settings.cuda_graphs)
    # the control messages are pickled host objects: a gloo group beside an NCCL one
    return engine, Control(dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None)


def leave_group() -> None:
    """After a failure mid-step: close this rank's connections, so that the other ranks'
    pending collectives fail now (a dead peer on gloo) rather than at their timeout. The group
    is broken from then on; Serve replaces the replica."""
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - already gone
        log.exception("leaving the DiT group failed")


def share_from(engine: ParallelDiT, plan: BranchPlan, layout: dict[str, tuple[tuple[int, ...], int]],
               handoff: Any | None, transport: KVTransport | None,
               timeout_s: float) -> tuple[dict[str, KVContext], TransferStats | None]:
    """A worker rank's contexts of a request: fetched by this rank from the handoff's own
    transport where it reaches this process (`transport.shares`, through this rank's
    `transport`), else (contexts built on rank 0, a fetch that failed) relayed by rank 0 over
    the group. Collective with rank 0's `deliver_shares`, which waits for it in a collective:
    an object-store fetch gives up after half the group's `timeout_s` and is relayed then (a
    NCCL pull within the transport's own deadlines, 40 s at most by default). Returns the
    stats of this rank's own fetch (None: relayed, or nothing to get: a rank with no branch
    of this request)."""
    fetched = None
    wants = engine.wants(plan)
    if handoff is not None and wants:
        model = engine.dit.model
        try:
            fetched = fetch_share(handoff.payload, wants, model.device, model.dtype, transport, timeout_s / 2)
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
    """Free on all interfaces, not loopback only (time_to_ready.free_port): other ranks dial it at the node's IP."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Join:
    """A job joining the group's batch: what a worker rank needs to build its share of it
    (`ParallelDiT.job`) and to receive its contexts. `key`: the job's name on the wire."""

    key: int
    plan: BranchPlan
    layout: dict[str, tuple[tuple[int, ...], int]]
    height: int
    width: int
    params: DenoiseParams
    noise: torch.Tensor
    fetch: bool = False  # the handoff was offered to the worker ranks (`RankWorker.offer`) to fetch from


@dataclass(frozen=True)
class Step:
    """Rank 0's word before a step: the jobs joining (each rank then gets its contexts, `RankWorker._contexts`, in
    this order), and the keys of the step's jobs in the order every rank packs them."""

    joins: tuple[Join, ...]
    order: tuple[int, ...]


class Control:
    """Rank 0's control messages to the worker ranks (`Step`, or None: the batch drained),
    broadcast over `group` (None: the default group, gloo on CPUs)."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group

    def send(self, message: Step | None) -> None:
        dist.broadcast_object_list([message], src=0, group=self.group)

    def receive(self) -> Step | None:
        box: list[Step | None] = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


@ray.remote(max_concurrency=4)  # a ping, an offer (and a test's look) answer while `follow` runs
class RankWorker:
    """Rank r >= 1 of a parallel DiT replica, in bundle r of the replica's placement group."""

    def __init__(self, load: Callable[[AppConfig], DiT], app_config: dict, rank: int) -> None:
        self.config = AppConfig.model_validate(app_config)
        self.rank = rank
        self.dit = load(self.config)
        self.engine: ParallelDiT | None = None
        self.control: Control | None = None
        self.last_fetch: TransferStats | None = None  # this rank's own fetch of the last request's contexts
        # this rank's receiving end of the replica's KV transport (its own NCCL pairs with the Thinkers)
        self.transport = make_transport(self.config.dit.transport, self.config.dit.parallel.size)
        self.offers: dict[int, Any] = {}  # job key -> its handoff, until the job joins here

    def offer(self, key: int, handoff: Any) -> None:
        """The handoff of a job about to join, to fetch this rank's share from. It comes as an
        actor call's argument, not in the control message, so that the object refs in it reach
        this process through Ray (as a borrower): refs pickled over the process group would
        carry no owner, and fetching them would hang."""
        self.offers[key] = handoff

    def ping(self) -> int:
        return self.rank

    def join(self, address: str) -> int:
        llm = self.dit.cfg.llm
        settings = self.config.dit.parallel
        config = engine_config(settings, llm.num_attention_heads, llm.num_key_value_heads)
        self.engine, self.control = join_group(self.dit, config, self.rank, address, settings)
        return self.rank

    def _contexts(self, join: Join) -> dict[str, KVContext]:
        """This rank's KV contexts of a joining job: from the handoff, or from rank 0
        (`share_from`)."""
        handoff = self.offers.pop(join.key, None) if join.fetch else None
        mine, self.last_fetch = share_from(self.engine, join.plan, join.layout, handoff, self.transport,
                                           self.config.dit.parallel.timeout_s)
        return mine

    def follow(self) -> int:
        """Rank 0's batch, step by step, until it drains: before each step, the jobs joining
        (this rank's share of each built here) and the step's order, then the same batched
        step. A job leaves when it ends, on every rank alike. Returns the steps run."""
        jobs: dict[int, ParallelJob] = {}
        steps = 0
        try:
            while (message := self.control.receive()) is not None:
                for join in message.joins:
                    jobs[join.key] = self.engine.job(join.plan, self._contexts(join), join.height, join.width,
                                                     join.params, join.noise)
                batch = [jobs[key] for key in message.order]
                self.engine.step(batch)
                jobs = {key: job for key, job in zip(message.order, batch) if not job.done}
                steps += 1
        except BaseException:
            log.exception("rank %d failed mid-request", self.rank)  # rank 0 reports its own failure, or this one's
            leave_group()  # the others fail at their next collective instead of waiting it out
            raise
        return steps


class DiTGroup:
    """Rank 0's view of its group: the worker actors, the engine, the batch's jobs on the
    ranks, and whether the group still works. `step` is the one-GPU `DiT.step` over the group,
    what `GroupBatch` (a `BatchDenoiser`) steps."""

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
        self.ours: dict[DenoiseJob, ParallelJob] = {}  # rank 0's share of each job on the group
        self.keys: dict[DenoiseJob, int] = {}
        self.next_key = 0
        self.calls: list | None = None  # the workers' `follow` calls while the batch runs
        self.steps = 0  # batched steps run over the group
        self.most = 0  # the most jobs stepped together
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
        self.engine, self.control = join_group(dit, self.config, 0, address, settings)
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

    def _join(self, job: DenoiseJob) -> tuple[Join, Any | None]:
        """Rank 0's share of a job joining the batch (checked here first: a job rank 0 refuses
        must not reach the workers), what the workers need of it, and the handoff they fetch
        their shares from (`_handoff`)."""
        contexts, params = job.contexts, job.params
        plan = BranchPlan.of(contexts, params, self.config.cfg)
        self.ours[job] = self.engine.job(plan, self.engine.share(plan, contexts), contexts.height, contexts.width,
                                         params, job.x, job.on_step, job.should_stop)
        self.keys[job] = self.next_key
        self.next_key += 1
        handoff = _handoff(job)
        join = Join(self.keys[job], plan, self.engine.context_layout(plan, contexts), contexts.height, contexts.width,
                    params, job.x.cpu(), handoff is not None)
        return join, handoff

    def _deliver(self, join: Join, job: DenoiseJob, handoff: Any | None) -> None:
        """The worker ranks' contexts of a joining job, where they could not fetch them
        themselves (`RankWorker._contexts`); then the handoff may be let go."""
        self.relayed_bytes += deliver_shares(self.engine, join.plan, job.contexts)
        if handoff is not None and self.transport is not None:
            self.transport.release(handoff.payload)

    def step(self, jobs: Sequence[DenoiseJob]) -> None:
        """One step of every unfinished job over the ranks (`DiT.step`'s contract for
        `BatchDenoiser`): jobs new to the group join it first (a job rank 0 refuses fails
        alone), the workers are told, then one batched `ParallelDiT.step` runs on every rank.
        A job's error shows on it once it has ended on every rank. Anything that fails on the
        way breaks the group (the ranks are out of step): raises `GroupBroken`."""
        if self.broken is not None:
            raise GroupBroken(f"the DiT replica's process group is broken: {self.broken}")
        joins = []
        for job in jobs:
            if job not in self.ours and not job.done:
                try:
                    joins.append((*self._join(job), job))
                except Exception as exc:  # noqa: BLE001 - a bad request fails alone
                    job.error = exc
        live = [job for job in jobs if job in self.ours]
        for gone in set(self.ours) - set(live):  # a batch rebuilt after a fault of its loop: forgotten
            del self.ours[gone], self.keys[gone]
        if not live:
            return
        ours = [self.ours[job] for job in live]
        try:
            if self.calls is None:
                self.check_health()
                self.calls = [worker.follow.remote() for worker in self.workers]
            offers = [w.offer.remote(join.key, handoff) for join, handoff, _ in joins if handoff is not None
                      for w in self.workers]
            ray.get(offers, timeout=self.settings.timeout_s)  # before the step's word, which makes them fetch
            self.control.send(Step(tuple(join for join, _, _ in joins), tuple(self.keys[job] for job in live)))
            for join, handoff, job in joins:
                self._deliver(join, job, handoff)
            self.engine.step(ours)
        except Exception as exc:  # noqa: BLE001 - a rank is gone, or rank 0's forward failed
            self.ours.clear()
            self.keys.clear()
            self._settle(exc)  # raises GroupBroken
            raise
        self.steps += 1
        self.most = max(self.most, len(live))
        for job, mine in zip(live, ours):
            job.x, job.index = mine.x, mine.index
            if mine.done:
                job.error = mine.error
                del self.ours[job], self.keys[job]

    def drained(self) -> None:
        """The batch has drained: the workers' `follow` calls end, and are checked (a failed
        one breaks the group; the jobs that ended are not touched, their latents came through
        the gathers)."""
        if self.calls is None or self.broken is not None:
            return
        try:
            self.control.send(None)
        except Exception as exc:  # noqa: BLE001 - a rank is gone
            self._settle(exc)
        self._settle(None)

    def _settle(self, failure: BaseException | None) -> None:
        """After the batch's steps end: the workers' calls must have ended too. `failure`: what
        rank 0's step raised (its forward or a collective); the other ranks wait in a
        collective then, so rank 0 leaves the group at once, which fails them too. A failed or
        silent worker, or such a failure, breaks the group: raises `GroupBroken`."""
        calls, self.calls = self.calls or [], None
        if failure is not None and self.broken is None:
            self.broken = f"rank 0 failed mid-step ({_first_line(failure)})"
            leave_group()
        ready, pending = ray.wait(calls, num_returns=len(calls), timeout=self.settings.timeout_s)
        problem = self.broken or (f"{len(pending)} worker rank(s) did not end the batch" if pending else None)
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


def _handoff(job: DenoiseJob) -> Any | None:
    """The handoff a job's contexts came in, where the worker ranks can fetch their shares from
    it themselves; None where rank 0 sends them (contexts built here, or a payload holding the
    tensors, which would travel to each worker whole)."""
    handoff = job.key.handoff if isinstance(job.key, ImageJob) else None
    return handoff if handoff is not None and portable(handoff.payload) else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


class GroupBatch(BatchDenoiser):
    """The `BatchDenoiser` a parallel replica's `DenoiseWorker` steps: the same joining,
    leaving and fairness rules over `DiTGroup.step`. A failed step is no memory matter to
    retry with fewer jobs: the group is broken, and every job it holds or is handed fails with
    `GroupBroken` (a 503; Serve replaces the replica)."""

    def __init__(self, group: DiTGroup, max_batch_size: int) -> None:
        super().__init__(group, max_batch_size)
        self.group = group

    def step_or_back_off(self) -> list[DenoiseJob]:
        try:
            ended = self.step()
        except Exception as exc:  # noqa: BLE001 - GroupBroken: the whole batch fails
            for job in self.running:
                job.error = exc
            ended, self.running = self.running, []
        if not self.running:
            try:
                self.group.drained()
            except GroupBroken:  # logged; the jobs that ended have their results, the next ones fail
                pass
        return ended
