"""Denoising spread over the ranks of a `torch.distributed` process group: CFG parallel and
(Ulysses) sequence parallel, alone or as a cfg x sequence grid, for one request or a batch of
requests of one latent grid stepped together.

Rank r sits at (cfg index c, sequence index s) = divmod(r, sequence).

- **CFG parallel.** The branches a request runs while CFG is on (cond, then cfg_text and
  cfg_img unless their context equals gen's) are dealt round-robin to the cfg indices: branch
  k of that list lives on cfg index k % cfg (`BranchPlan`). A rank holds only the KV contexts
  of its own branches. Each step every rank runs the forward of its branches, the velocities
  (latent rows x 64, small) are gathered from all ranks, and every rank applies the same CFG
  combination, renorm and Euler step to the same numbers, so all ranks hold the same latents
  without sending them. Outside `cfg_interval` only cond runs: where the group's size divides
  the head counts (2 or 4 ranks for BAGEL-7B's 28 query / 4 KV heads), cond's rows are then
  split over every rank (`help_cond`, each holding cond's context for its KV heads only);
  otherwise (3 or 8 ranks) the ranks of the other cfg indices idle through the forward and
  only join the gather.
- **Sequence parallel (Ulysses).** The image block `[<|vision_start|>] + latents +
  [<|vision_end|>]` of a branch is cut into `sequence` contiguous row ranges, one a rank of
  the cfg index's sequence group. Everything but attention is row-wise, so a rank runs its
  rows only. In each layer's attention, one all-to-all turns (rows of mine, all heads) into
  (all rows, heads of mine): query heads and KV heads are split alike (contiguous groups, so
  each rank's query heads use its own KV heads under GQA), and `sequence` must divide both
  head counts. The KV context is replicated on the sequence ranks (each attends over its heads
  of it). A second all-to-all returns each rank's rows with all heads.

Cross-request batching: `ParallelDiT.step` advances several jobs (`ParallelJob`, each with
its own plan, schedule, params and TaylorSeer states) of one latent grid by a step each, as
`DiT.step` does on one GPU: a rank packs the row blocks of all jobs' branches it computes into
one forward over its sequence group (the Ulysses all-to-alls carry the packed rows; the jobs
whose cond is spread over every rank at this step go in a second forward over the whole
group), and one gather carries every job's velocity rows. Jobs join and leave between steps.

Cancellation and callbacks: rank 0 owns each job's `should_stop` and `on_step`; its answers
travel in the step's gather (a flag per job), so every rank ends a job at the same step, and a
failing `on_step` on rank 0 stops the others one step later. Collectives are the only thing
that ties the ranks: all ranks must step the same jobs, in the same order, made from the same
plan, size, params and noise (`bagel_ray.serve.dit_group` has rank 0 tell the others).

The engine sees only a process group (gloo on CPUs, NCCL on GPUs); how the ranks were started
is the caller's business (`bagel_ray.serve.dit_group` on Ray, `torch.multiprocessing` in the
tests, torchrun in `benchmarks/bench_parallel.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from bagel_ray.engine.cancel import Cancelled
from bagel_ray.engine.cfg import combine
from bagel_ray.engine.dit import BRANCHES, DenoiseParams, DiT, StepRecord, guidance, host_to_device
from bagel_ray.engine.kv_context import ImageContexts, KVContext
from bagel_ray.engine.schedule import euler_step, make_schedule
from bagel_ray.engine.taylorseer import TaylorState
from bagel_ray.model.kernels.rope import QKNormRope
from bagel_ray.model.image_transforms import grid_position_ids
from bagel_ray.model.llm import ExpertRows, RaggedKV, sdpa

MAX_CFG = len(BRANCHES)
# torch 2.13 renamed all_gather_into_tensor (the old name warns); older torch has only that
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class ParallelConfig:
    """How many ranks one request spreads over: `cfg` ranks for its CFG branches (at most 3,
    a request's branch count) times `sequence` ranks for a branch's rows."""

    cfg: int = 1
    sequence: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.cfg <= MAX_CFG:
            raise ValueError(f"parallel.cfg must be 1, 2 or 3 (a request has at most {MAX_CFG} CFG branches), got {self.cfg}")
        if self.sequence < 1:
            raise ValueError(f"parallel.sequence must be >= 1, got {self.sequence}")

    @property
    def size(self) -> int:
        return self.cfg * self.sequence

    def check_heads(self, heads: int, kv_heads: int) -> None:
        """Ulysses splits query and KV heads alike over the sequence ranks."""
        if heads % self.sequence or kv_heads % self.sequence:
            raise ValueError(f"parallel.sequence={self.sequence} must divide the model's attention head counts "
                             f"({heads} query heads, {kv_heads} key/value heads)")

    def coords(self, rank: int) -> tuple[int, int]:
        """(cfg index, sequence index) of a rank."""
        return divmod(rank, self.sequence)


def row_split(n: int, parts: int) -> list[int]:
    """Sizes of `parts` contiguous ranges covering n rows, the first ones a row longer."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def latent_shares(n_lat: int, parts: int) -> list[tuple[int, int]]:
    """The latent rows [lo, hi) in each of `parts` row ranges of an image block of n_lat
    latents between its two markers (the first range holds the start marker, the last the end
    marker)."""
    shares, off = [], 0
    for m in row_split(n_lat + 2, parts):
        lo = max(off, 1) - 1
        shares.append((lo, max(min(off + m, n_lat + 1) - 1, lo)))
        off += m
    return shares


def head_slice(context: KVContext, index: int, parts: int) -> KVContext:
    """KV heads group `index` of `parts` of a context (a view): what one Ulysses rank attends over."""
    k = context.kv.shape[3] // parts
    return KVContext(context.kv[:, :, :, index * k : (index + 1) * k], context.rope)


@dataclass(frozen=True)
class BranchPlan:
    """Which branches a request runs and on which cfg index each lives. `run`: the branches that
    run at some step of the schedule (`guidance`), in `BRANCHES` order; `same`: branches whose
    context equals gen's (they reuse cond's velocity, and without TaylorSeer never run);
    `taylorseer`: the request uses the step cache, so cond is never spread over all ranks."""

    run: tuple[str, ...]
    same: frozenset[str]
    cfg: int
    taylorseer: bool = False

    @staticmethod
    def of(contexts: ImageContexts, params: DenoiseParams, cfg: int) -> "BranchPlan":
        schedule = make_schedule(params.num_inference_steps, params.timestep_shift)
        same = frozenset(b for b in BRANCHES[1:] if contexts.same_as_gen(b))
        taylor = {b: TaylorState() for b in BRANCHES} if params.taylorseer else None
        ran: set[str] = set()
        for t in schedule.timesteps:  # with TaylorSeer the forward counts decide reuse: count them
            wanted, run = guidance(params, t, same.__contains__, taylor)[2:]
            ran.update(run)
            for b in wanted if taylor is not None else ():
                taylor[b].advance()
        return BranchPlan(tuple(b for b in BRANCHES if b in ran), same, cfg, params.taylorseer)

    def home(self, branch: str) -> int:
        return self.run.index(branch) % self.cfg

    def branches_of(self, c: int) -> tuple[str, ...]:
        return tuple(b for b in self.run if self.home(b) == c)

    def share(self, contexts: ImageContexts, c: int) -> dict[str, KVContext]:
        """The contexts cfg index c needs (views of `contexts`; copy them to ship them)."""
        return {b: contexts.branch(b) for b in self.branches_of(c)}


class UlyssesKV:
    """Attention of a branch block whose rows are split over a group (the `RaggedKV` contract,
    but `past[b]` holds only this rank's KV heads: ([T_b, kv / ranks, hd], ...) per layer, or
    None). One all-to-all trades rows for heads, each rank attends with its heads over all rows
    and its heads of the context, a second all-to-all trades back. Returns this rank's rows
    with all heads, and its rows' K/V. With `out` ([B, n, heads, hd]) the rows are written
    there (where a CUDA graph of the next layer reads them; the all-to-alls stay outside the
    graphs)."""

    def __init__(self, past: list[list[tuple[torch.Tensor, torch.Tensor]] | None], group: dist.ProcessGroup | None,
                 sizes: list[int], out: torch.Tensor | None = None) -> None:
        self.past, self.group, self.sizes, self.out = past, group, sizes, out
        self.offsets = [sum(sizes[:j]) for j in range(len(sizes))]

    def into(self, out: torch.Tensor) -> "UlyssesKV":
        return UlyssesKV(self.past, self.group, self.sizes, out)

    def _exchange(self, send: torch.Tensor, in_sizes: list[int], out_sizes: list[int]) -> torch.Tensor:
        recv = send.new_empty(sum(out_sizes), *send.shape[1:])
        dist.all_to_all_single(recv, send, out_sizes, in_sizes, group=self.group)
        return recv

    def __call__(self, layer: int, qk: torch.Tensor, v: torch.Tensor, norm: QKNormRope) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        qk = norm(qk)
        q, k = qk[:, :, : norm.q_heads], qk[:, :, norm.q_heads :]
        B, n, H, hd = q.shape
        kvh, S = k.shape[2], len(self.sizes)
        hq, hk = H // S, kvh // S
        # to sequence rank j: its head group of q, k and v for my rows, [S, B, n, hq + 2 hk, hd]
        send = torch.cat((q.view(B, n, S, hq, hd), k.view(B, n, S, hk, hd), v.view(B, n, S, hk, hd)), dim=3)
        send = send.permute(2, 0, 1, 3, 4).reshape(S * B * n, hq + 2 * hk, hd)
        recv = self._exchange(send, [B * n] * S, [B * m for m in self.sizes])
        blocks = torch.cat([r.view(B, m, hq + 2 * hk, hd) for r, m in zip(recv.split([B * m for m in self.sizes]), self.sizes)], dim=1)
        qs, ks, vs = blocks.split((hq, hk, hk), dim=2)
        outs = []
        for b, past in enumerate(self.past):
            kb, vb = ks[b], vs[b]
            if past is not None and past[layer][0].shape[0]:
                kb = torch.cat((past[layer][0], kb))
                vb = torch.cat((past[layer][1], vb))
            outs.append(sdpa(qs[b : b + 1], kb[None], vb[None], None))
        out = torch.cat(outs)  # [B, all rows, hq, hd]
        back = torch.cat([out[:, o : o + m].reshape(B * m, hq, hd) for o, m in zip(self.offsets, self.sizes)])
        mine = self._exchange(back, [B * m for m in self.sizes], [B * n] * S)
        attn = self.out if self.out is not None else mine.new_empty(B, n, H, hd)
        attn.view(B, n, S, hq, hd).copy_(mine.view(S, B, n, hq, hd).permute(1, 2, 0, 3, 4))
        return attn, (k, v)


@dataclass(eq=False, repr=False)
class ParallelJob:
    """One request's state on one rank, made by `ParallelDiT.job` and advanced by `step`, alone
    or beside other jobs: the latents (the same on every rank) and the index of the next step;
    `error` as in `DenoiseJob`. With TaylorSeer, `taylor` holds a state per branch on every
    rank: its forward count (the same on every rank, so all decide alike which
    forwards are full) and, for the branches this rank computes, the factors of its rows."""

    plan: BranchPlan
    branches: dict[str, KVContext]  # this rank's branches only
    helper: KVContext | None  # cond's KV heads of this rank when all ranks run cond (`help_cond`)
    params: DenoiseParams
    grid: tuple[int, int]
    timesteps_host: torch.Tensor
    timesteps: torch.Tensor
    dts: torch.Tensor
    pos_ids: torch.Tensor
    x: torch.Tensor
    on_step: Callable[[StepRecord], None] | None = None
    should_stop: Callable[[], bool] | None = None
    index: int = 0
    error: BaseException | None = None
    stop_next: bool = False  # rank 0: tell the others to stop at the next gather
    helped: int = 0  # steps run with cond split over every rank
    ended: bool = False  # stopped early, on every rank alike
    taylor: dict[str, TaylorState] | None = None  # per branch, with `params.taylorseer`

    @property
    def done(self) -> bool:
        return self.ended or self.index >= self.total

    @property
    def total(self) -> int:
        return self.timesteps_host.shape[0]


class ParallelDiT:
    """A `DiT` engine as one rank of a cfg x sequence grid over `group` (None: the default
    group). Every rank of the group builds one; each creates its own sequence subgroup with
    the other members only (so `group` may be a subgroup of the world). Build one per grid
    and process: a second one over the same ranks would ask for a subgroup of the same name.

    `help_cond`: at a step where only cond runs (outside `cfg_interval`, or no CFG), the ranks
    of the other cfg indices would idle; with it, cond's rows are split over all ranks instead
    (Ulysses over the whole group), where the group's size divides the head counts (2 or 4
    ranks for BAGEL-7B; not 3 or 8). Each such rank then holds cond's context for its heads
    only (a 1 / size share). Off, or where the heads do not divide, those ranks idle. Nor does
    it help for a TaylorSeer request (`helps`): a branch's cache holds the last layer's output
    of the rows its rank computes, so cond's rows stay on cond's ranks at every step; its
    Taylor steps run no layer anyway, only its full ones (about one in three) would be split.

    TaylorSeer: a branch's full forwards run as usual on its ranks, and each of them refreshes
    the factors of its own rows from the last layer's output; on its Taylor forwards those
    ranks predict their rows' velocity from the factors (`DiT.predicted_velocity`, row-wise),
    and the gather is the same. Which forwards are full depends only on the branch's forward
    count, which every rank keeps for every branch: the ranks agree without talking.

    `cuda_graphs`: on a GPU, the rank's layers replay as CUDA graphs between the split
    attentions (`DiT.layers`, where `dit.cuda_graphs` is also on), the all-to-alls outside
    them; each rank captures the shapes of its own rows, keyed by its markers."""

    def __init__(self, dit: DiT, config: ParallelConfig, group: dist.ProcessGroup | None = None,
                 help_cond: bool = True, cuda_graphs: bool = False) -> None:
        llm = dit.cfg.llm
        config.check_heads(llm.num_attention_heads, llm.num_key_value_heads)
        world = dist.get_world_size(group)
        if world != config.size:
            raise ValueError(f"parallel: cfg {config.cfg} x sequence {config.sequence} = {config.size} ranks, "
                             f"but the process group has {world}")
        self.dit, self.config, self.group = dit, config, group
        self.rank = dist.get_rank(group)
        self.c, self.s = config.coords(self.rank)
        ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
        members = ranks[self.c * config.sequence : (self.c + 1) * config.sequence]
        self.seq_group = dist.new_group(members, use_local_synchronization=True) if config.sequence > 1 else None
        self.can_help = config.cfg > 1 and llm.num_attention_heads % config.size == 0 and llm.num_key_value_heads % config.size == 0
        self.help_cond = help_cond and self.can_help
        self.cuda_graphs = cuda_graphs
        self._experts: dict[tuple[int, int, bool, bool], ExpertRows] = {}

    # -- contexts over the group -----------------------------------------------------------------

    def helps(self, plan: BranchPlan) -> bool:
        """Whether the ranks split cond's rows over all of them at cond-only steps of `plan`."""
        return self.help_cond and not plan.taylorseer

    @staticmethod
    def context_layout(plan: BranchPlan, contexts: ImageContexts) -> dict[str, tuple[tuple[int, ...], int]]:
        """What a receiving rank must know before `receive_contexts`: each running branch's
        KV shape and next position (small: it travels with the request)."""
        return {b: (tuple(contexts.branch(b).kv.shape), contexts.branch(b).rope) for b in BRANCHES
                if b in plan.run or b == "cond"}

    def wants(self, plan: BranchPlan, rank: int | None = None) -> dict[str, tuple[int, int]]:
        """What a rank (default: this one) keeps of a request's contexts, per branch as (KV head
        group, of how many groups): (0, 1) for its cfg index's branches, whole, and (rank,
        size) for cond's heads a rank attends over when it helps cond but lives elsewhere.
        `share` cuts these out of the contexts; a rank that fetches its own share from the
        handoff asks for them."""
        rank = self.rank if rank is None else rank
        c = self.config.coords(rank)[0]
        out = {b: (0, 1) for b in plan.branches_of(c)}
        if self.helps(plan) and c > 0:
            out["cond"] = (rank, self.config.size)
        return out

    def share(self, plan: BranchPlan, contexts: ImageContexts, rank: int | None = None) -> dict[str, KVContext]:
        """A rank's `wants` of a request's contexts (views of them; copy them to ship them)."""
        return {b: head_slice(contexts.branch(b), i, n) if n > 1 else contexts.branch(b)
                for b, (i, n) in self.wants(plan, rank).items()}

    def holding(self, fetched: bool) -> list[bool]:
        """Whether each rank holds its share already (fetched from the handoff's transport
        itself). Collective: every rank says so before `send_contexts` / `receive_contexts`,
        which then carry only the shares of the ranks that do not."""
        flags = torch.tensor([int(fetched)], dtype=torch.int32, device=self.dit.model.device)
        out = flags.new_empty(self.config.size)
        _all_gather(out, flags, group=self.group)
        return [bool(f) for f in out.tolist()]

    def send_contexts(self, plan: BranchPlan, contexts: ImageContexts, ranks: list[int] | None = None) -> int:
        """Rank 0: each of `ranks` (default: every other rank) gets its `share` over the group
        itself (GPU to GPU on NCCL), in `BRANCHES` order. Collective with `receive_contexts` on
        those ranks. Returns the bytes sent."""
        dtype, sent = self.dit.model.dtype, 0
        for rank in range(1, self.config.size) if ranks is None else ranks:
            for b, c in sorted(self.share(plan, contexts, rank).items(), key=lambda item: BRANCHES.index(item[0])):
                kv = c.kv.to(dtype).contiguous()
                dist.send(kv, self._global(rank), group=self.group)
                sent += kv.numel() * kv.element_size()
        return sent

    def receive_contexts(self, plan: BranchPlan, layout: dict[str, tuple[tuple[int, ...], int]]) -> dict[str, KVContext]:
        """A rank other than 0: its `share`, as rank 0's `send_contexts` sends it."""
        out = {}
        wants = self.wants(plan)
        for b in (b for b in BRANCHES if b in wants):
            shape, rope = layout[b]
            n = wants[b][1]
            shape = (*shape[:3], shape[3] // n, *shape[4:])  # a helper's heads of cond
            kv = torch.empty(shape, dtype=self.dit.model.dtype, device=self.dit.model.device)
            dist.recv(kv, self._global(0), group=self.group)
            out[b] = KVContext(kv, rope)
        return out

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    # -- the rows of this rank ---------------------------------------------------------------

    def _expert_rows(self, batch: int, n: int, start: bool, end: bool) -> ExpertRows:
        """Which of this rank's block rows are the (und) markers: kept per shape, so that the
        host reads the mask once."""
        key = (batch, n, start, end)
        if key not in self._experts:
            mask = torch.ones(batch, n, dtype=torch.bool)
            if start:
                mask[:, 0] = False
            if end:
                mask[:, -1] = False
            rows = ExpertRows.from_mask(mask)
            dev = self.dit.model.device
            self._experts[key] = ExpertRows(rows.experts.to(dev), rows.und_index.to(dev))
        return self._experts[key]

    @torch.inference_mode()
    def _velocities(self, blocks: list[tuple[ParallelJob, KVContext]], S: int, s: int,
                    group: dist.ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor]:
        """v of this rank's latent rows (share s of S, split over `group`) of each (job, context)
        block, in one forward: [B, rows, 64], and those rows of the residual stream after the
        last layer (before the final norm, what TaylorSeer keeps) [B, rows, D]. The blocks'
        jobs share one latent grid; each block takes its job's latents and time. With S > 1 the
        contexts hold only this rank's KV heads."""
        dit, model = self.dit, self.dit.model
        dev, B = model.device, len(blocks)
        h, w = blocks[0][0].grid
        sizes = row_split(h * w + 2, S)
        lo, hi = latent_shares(h * w, S)[s]
        start, end = s == 0, s == S - 1
        n_l = hi - lo
        x = torch.cat([job.x[lo:hi] for job, _ in blocks])
        t = torch.cat([job.timesteps[job.index].reshape(1).expand(n_l) for job, _ in blocks])
        latents = model.latent_embeds(x, t, blocks[0][0].pos_ids[lo:hi].repeat(B)).view(B, n_l, -1)
        markers = dit.markers()
        parts = ([markers[:1].expand(B, 1, -1)] if start else []) + [latents.to(markers.dtype)] + (
            [markers[1:].expand(B, 1, -1)] if end else [])
        rows = torch.cat(parts, dim=1)
        n = rows.shape[1]
        contexts = [c for _, c in blocks]
        positions = host_to_device([c.rope for c in contexts], dev)[:, None].expand(B, n)
        past = [[c.layer(i) for i in range(c.kv.shape[0])] if c.length else None for c in contexts]
        attention = RaggedKV(past) if S == 1 else UlyssesKV(past, group, sizes)
        stream, hidden = dit.layers(rows, positions, self._expert_rows(B, n, start, end), attention, (start, end),
                                    self.cuda_graphs and dit.cuda_graphs)
        latent = slice(int(start), n - int(end))
        return model.velocity(hidden[:, latent]), stream[:, latent]

    # -- the loop -------------------------------------------------------------------------------

    def job(self, plan: BranchPlan, branches: dict[str, KVContext], height: int, width: int, params: DenoiseParams,
            noise: torch.Tensor, on_step: Callable[[StepRecord], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> ParallelJob:
        """This rank's share of a request: `branches` must hold the contexts of the branches
        `plan` homes on this rank's cfg index (more are ignored)."""
        if plan.cfg != self.config.cfg:
            raise ValueError(f"the plan deals branches over {plan.cfg} cfg ranks, this grid has {self.config.cfg}")
        missing = [b for b in plan.branches_of(self.c) if b not in branches]
        if missing:
            raise ValueError(f"rank {self.rank} (cfg index {self.c}) needs the contexts of {missing}")
        h, w = self.dit.latent_grid(height, width)
        if h * w + 2 < self.config.sequence:
            raise ValueError(f"an image of {h * w} latent rows is too small for parallel.sequence={self.config.sequence}")
        if tuple(noise.shape) != (h * w, self.dit.cfg.patch_latent_dim):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {(h * w, self.dit.cfg.patch_latent_dim)}")
        if plan.taylorseer != params.taylorseer:
            raise ValueError("the plan was made for other params (taylorseer differs)")
        schedule = make_schedule(params.num_inference_steps, params.timestep_shift)
        dev = self.dit.model.device
        mine = {b: branches[b] for b in plan.branches_of(self.c)}
        helper = None
        if self.helps(plan):
            if "cond" not in branches:
                raise ValueError(f"rank {self.rank} helps the cond branch: it needs cond's context (or its heads of it)")
            helper = branches["cond"]
            if helper.kv.shape[3] == self.dit.cfg.llm.num_key_value_heads:  # the whole context: take this rank's heads
                helper = head_slice(helper, self.rank, self.config.size)
        return ParallelJob(plan, mine, helper, params, (h, w), schedule.timesteps, schedule.timesteps.to(dev),
                           schedule.dts.to(dev), grid_position_ids(h, w, self.dit.cfg.max_latent_size).to(dev),
                           noise.to(dev, torch.float32), on_step if self.rank == 0 else None,
                           should_stop if self.rank == 0 else None,
                           taylor={b: TaylorState() for b in BRANCHES} if params.taylorseer else None)

    def _pieces(self, job: ParallelJob, run: list[str], helping: bool) -> list[list[tuple[str, int, int]]]:
        """Per rank, the (branch, latent rows [lo, hi)) it computes of a job at a step, in its
        order: every rank works this out alike, so the gather needs no header."""
        n, size = job.grid[0] * job.grid[1], self.config.size
        if helping:
            return [[("cond", lo, hi)] for lo, hi in latent_shares(n, size)]
        shares = latent_shares(n, self.config.sequence)
        coords = [self.config.coords(r) for r in range(size)]
        return [[(b, *shares[s]) for b in run if job.plan.home(b) == c] for c, s in coords]

    def _gather(self, pieces: list[list[list[tuple[str, int, int]]]], v: list[torch.Tensor | None],
                stops: list[bool]) -> tuple[list[torch.Tensor], list[bool]]:
        """One all-gather of every rank's velocity rows of every job (`pieces[k]`, `v[k]`: job
        k's), and rank 0's stop flags (a tail of one value per job). Returns per job the
        [size, its most rows on a rank, 64] rows, and the flags."""
        dim, size = self.dit.cfg.patch_latent_dim, self.config.size
        counts = [[sum(hi - lo for _, lo, hi in job[r]) for r in range(size)] for job in pieces]
        rows = max(sum(c[r] for c in counts) for r in range(size))
        tail = -(-len(pieces) // dim)  # rows of stop flags
        buf = torch.zeros(rows + tail, dim, dtype=self.dit.model.llm2vae.weight.dtype, device=self.dit.model.device)
        off = 0
        for k, vk in enumerate(v):
            if vk is not None:
                buf[off : off + counts[k][self.rank]] = vk.reshape(-1, dim)
            off += counts[k][self.rank]
        flags = buf[rows:].view(-1)
        for k, stop in enumerate(stops):
            if stop:
                flags[k] = 1
        out = buf.new_empty(size * buf.shape[0], dim)
        _all_gather(out, buf, group=self.group)
        out = out.view(size, *buf.shape)
        told = (out[0, rows:].reshape(-1)[: len(pieces)] != 0).tolist()
        per_job, offs = [], [0] * size
        for k in range(len(pieces)):
            most = max(counts[k])
            per_job.append(torch.stack([out[r, offs[r] : offs[r] + most] for r in range(size)]) if most else out[:, :0])
            offs = [o + c for o, c in zip(offs, counts[k])]
        return per_job, told

    @staticmethod
    def _assemble(pieces: list[list[tuple[str, int, int]]], gathered: torch.Tensor) -> dict[str, torch.Tensor]:
        """The full [h*w, 64] velocity of each branch of a job (its pieces lie in rank order)."""
        parts: dict[str, list[torch.Tensor]] = {}
        for rank, mine in enumerate(pieces):
            off = 0
            for b, lo, hi in mine:
                parts.setdefault(b, []).append(gathered[rank, off : off + hi - lo])
                off += hi - lo
        return {b: torch.cat(p) for b, p in parts.items()}

    @torch.inference_mode()
    def step(self, jobs: Sequence[ParallelJob]) -> None:
        """Advance every unfinished job by one step of its own schedule (a collective: every
        rank calls it with the same jobs in the same order; they must share one latent grid).

        The (job, branch) blocks this rank computes run as one forward over its sequence group
        (as `DiT.step` packs a one-GPU batch: the Ulysses all-to-alls carry the packed rows);
        the blocks of jobs whose cond is spread over every rank this step (`helps`) run as a
        second forward over the whole group; then one gather carries every job's velocity rows
        and rank 0's stop flags, and each job combines its own branches and takes its Euler
        step. A job rank 0 stops ends here on every rank (`Cancelled`); one whose `on_step`
        raised on rank 0 keeps the error and ends on every rank one step later."""
        live = [job for job in jobs if not job.done]
        if not live:
            return
        grids = {job.grid for job in live}
        if len(grids) > 1:
            raise ValueError(f"a parallel step runs jobs of one latent grid, got {sorted(grids)}")
        rank0 = self.rank == 0
        stops = [rank0 and (job.stop_next or (job.should_stop is not None and job.should_stop())) for job in live]
        guides, forwards, helping, pieces = [], [], [], []
        for job in live:
            g = guidance(job.params, job.timesteps_host[job.index], job.plan.same.__contains__, job.taylor)
            run = g[3]
            helps = self.helps(job.plan) and run == ["cond"]
            guides.append(g)
            forwards.append([b for b in run if job.taylor is None or job.taylor[b].next_is_full])
            helping.append(helps)
            pieces.append(self._pieces(job, run, helps))
        v: list[dict[str, torch.Tensor]] = [{} for _ in live]
        outputs: list[dict[str, torch.Tensor]] = [{} for _ in live]  # last-layer outputs of full TaylorSeer rows
        helped = [k for k, h in enumerate(helping) if h]
        if helped:  # every rank: cond's rows of these jobs split over the whole group
            v_help = self._velocities([(live[k], live[k].helper) for k in helped], self.config.size, self.rank, self.group)[0]
            for row, k in enumerate(helped):
                v[k]["cond"] = v_help[row]
                live[k].helped += 1
        S = self.config.sequence
        blocks = [(k, b) for k in range(len(live)) if not helping[k] for b, _, _ in pieces[k][self.rank] if b in forwards[k]]
        if blocks:  # the same on every rank of this sequence group: the forward counts agree
            contexts = [live[k].branches[b] for k, b in blocks]
            if S > 1:
                contexts = [head_slice(c, self.s, S) for c in contexts]
            v_full, stream = self._velocities([(live[k], c) for (k, _), c in zip(blocks, contexts)], S, self.s, self.seq_group)
            for row, (k, b) in enumerate(blocks):
                v[k][b] = v_full[row]
                if live[k].taylor is not None:
                    outputs[k][b] = live[k].taylor[b].keep(stream[row])
        mine: list[torch.Tensor | None] = []
        for k, job in enumerate(live):
            names = [b for b, _, _ in pieces[k][self.rank]]
            for b in names:
                if b not in v[k]:  # a Taylor forward: this rank's rows from its factors
                    v[k][b] = self.dit.predicted_velocity(job.taylor[b])
            mine.append(torch.stack([v[k][b] for b in names]) if names else None)
        gathered, told = self._gather(pieces, mine, stops)
        for k, job in enumerate(live):
            if told[k]:
                job.ended = True
                if job.error is None:
                    job.error = Cancelled(f"denoising stopped before step {job.index + 1} of {job.total}: the request was cancelled")
                continue
            s_t, s_i, wanted, _ = guides[k]
            if job.taylor is not None:  # every rank counts every branch's forward; factors where it has rows
                for b in wanted:
                    job.taylor[b].advance(outputs[k].get(b))
            vk = self._assemble(pieces[k], gathered[k])
            for b in wanted:
                vk.setdefault(b, vk["cond"])
            p = job.params
            guided = combine(vk["cond"], vk.get("cfg_text"), vk.get("cfg_img"), s_t, s_i, p.cfg_renorm_type, p.cfg_renorm_min)
            if job.on_step is not None and job.error is None:
                try:
                    job.on_step(StepRecord(job.index, job.total, float(job.timesteps_host[job.index]), job.x, vk, guided,
                                           len(live), tuple(forwards[k])))
                except Exception as exc:  # rank 0's callback: the others stop at the next gather
                    job.error, job.stop_next = exc, True
            job.x = euler_step(job.x, guided, job.dts[job.index])
            job.index += 1

    def denoise(self, plan: BranchPlan, branches: dict[str, KVContext], height: int, width: int,
                params: DenoiseParams, noise: torch.Tensor, on_step: Callable[[StepRecord], None] | None = None,
                should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
        """One job stepped alone: the final latent tokens [h*w, 64] (the same on every rank). Raises `Cancelled` on
        every rank when rank 0's `should_stop` says yes, and on rank 0 what its `on_step` raised."""
        job = self.job(plan, branches, height, width, params, noise, on_step, should_stop)
        while not job.done:
            self.step([job])
        if job.error is not None:
            raise job.error
        return job.x

    def denoise_contexts(self, contexts: ImageContexts, params: DenoiseParams, noise: torch.Tensor,
                         on_step: Callable[[StepRecord], None] | None = None,
                         should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
        """`denoise` for a rank that holds all of a request's contexts (it keeps only its own)."""
        plan = BranchPlan.of(contexts, params, self.config.cfg)
        return self.denoise(plan, self.share(plan, contexts), contexts.height, contexts.width, params, noise,
                            on_step, should_stop)
