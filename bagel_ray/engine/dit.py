"""The DiT engine: flow-matching denoising with CFG over KV contexts, and VAE decode
(spec 6.2-6.4).

Each step builds one query block `[<|vision_start|>] + latents + [<|vision_end|>]` (latents on
the gen expert, markers on und, all at the branch's next position) and runs it over each
active branch's cached context without caching it. A request's denoising is a `DenoiseJob`,
and `DiT.step` advances several jobs by one step each: every (job, active branch) pair is one
row block, and all blocks of the same latent grid run as one batched forward, so requests of
different users share the weight reads and fill the GEMMs. Each job keeps its own schedule,
step index, CFG gating, scales and renorm; a branch whose context equals gen's (text2img's
cfg_img without think) is not run, its velocity is the conditional one. `DiT.denoise` is the
one-job case of the same step.

With `taylorseer` a job keeps a TaylorSeer cache per branch in its own `DenoiseJob`
(`engine/taylorseer.py`): on a branch's full forwards its block runs in the batched forward
as usual and the last layer's output refreshes the cache; on the others the block takes no
part in the forward, and its velocity is the final norm and `llm2vae` of the cache's
prediction. Jobs with and without it, on full or predicted forwards, share one step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from PIL import Image

from bagel_ray.engine.cancel import Cancelled
from bagel_ray.engine.cfg import combine
from bagel_ray.engine.context import ContextBuilder
from bagel_ray.engine.dit_graphs import BlockAttention, DitGraphs
from bagel_ray.engine.kv_context import ImageContexts, KVContext
from bagel_ray.engine.params import DenoiseParams
from bagel_ray.engine.schedule import Schedule, cfg_active, euler_step, make_schedule
from bagel_ray.engine.taylorseer import TaylorState
from bagel_ray.model.bagel import BagelModel
from bagel_ray.model.image_transforms import decoded_to_pil, grid_position_ids, tokens_to_latent
from bagel_ray.model.llm import ExpertRows, ForwardMode, RaggedKV
from bagel_ray.model.tokenizer import BagelTokenizer
from bagel_ray.model.vae import AutoEncoder

BRANCHES = ("cond", "cfg_text", "cfg_img")


def host_to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """A few host integers on `device` without a host sync: `torch.tensor(..., device=cuda)`
    copies from pageable memory and waits for the stream, which would stall every denoising
    step until the previous one finished; a copy from pinned memory does not."""
    t = torch.tensor(values)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def guidance(params: DenoiseParams, t: torch.Tensor, same_as_gen: Callable[[str], bool],
             taylor: dict[str, TaylorState] | None = None) -> tuple[float, float, list[str], list[str]]:
    """The scales of a step at time `t`, gated by the CFG interval; the branches the
    combination needs; and those to run (a branch whose context equals gen's reuses the
    conditional velocity). With TaylorSeer (`taylor`, the job's per-branch states) such a
    branch reuses it only while it has run at every step so far: then its cache equals the
    conditional branch's. Otherwise (CFG starting after the first step) its count lags, and it
    runs on its own cache as the official one does. A function of the schedule and the
    branches' forward counts alone, so every rank of a parallel replica (`dit_parallel`)
    decides the same without talking."""
    on = cfg_active(t, params.cfg_interval)
    s_t = params.cfg_text_scale if on else 1.0
    s_i = params.cfg_img_scale if on else 1.0
    wanted = ["cond"] + (["cfg_text"] if s_t > 1.0 else []) + (["cfg_img"] if s_t > 1.0 and s_i > 1.0 else [])

    def reuses(b: str) -> bool:
        return same_as_gen(b) and (taylor is None or taylor[b].step == taylor["cond"].step)

    run = [b for b in wanted if b == "cond" or not reuses(b)]
    return s_t, s_i, wanted, run


@dataclass(frozen=True)
class StepRecord:
    """What one denoising step did, for progress bars, stats and tests."""

    index: int
    total: int
    t: float
    x: torch.Tensor  # latent tokens before the update
    velocities: dict[str, torch.Tensor]  # per branch that ran (or was reused)
    guided: torch.Tensor
    batch: int = 1  # jobs whose rows shared this step's forward (this one included)
    forwards: tuple[str, ...] = ()  # the branches whose velocity came from a network forward (not predicted or reused)


@dataclass(eq=False, repr=False)
class DenoiseJob:
    """One request's denoising, made by `DiT.job` and advanced by `DiT.step`, alone or beside
    other jobs. It carries the request's inputs and its state between steps: the latents `x`
    (on the device, fp32), the index of the next step, and how it ended. `error` is set when
    it ends early: `Cancelled` when `should_stop` said yes before a step, or the exception its
    `on_step` raised. `key` is the caller's own handle (the serving layer's request)."""

    contexts: ImageContexts
    params: DenoiseParams
    grid: tuple[int, int]  # latent (h, w): jobs of one grid share a forward
    schedule: Schedule  # on the host, for the CFG gating
    timesteps: torch.Tensor  # the schedule on the device, so a step needs no copies
    dts: torch.Tensor
    branches: dict[str, KVContext]
    pos_ids: torch.Tensor
    x: torch.Tensor
    on_step: Callable[[StepRecord], None] | None = None
    should_stop: Callable[[], bool] | None = None
    key: object = None
    index: int = 0
    error: BaseException | None = None
    taylor: dict[str, TaylorState] | None = None  # per branch, with `params.taylorseer`

    @property
    def total(self) -> int:
        return len(self.schedule)

    @property
    def done(self) -> bool:
        return self.error is not None or self.index >= self.total

    def __repr__(self) -> str:  # the state, not the tensors
        h, w = self.grid
        return f"DenoiseJob(key={self.key!r}, grid={h}x{w}, step {self.index}/{self.total}, error={self.error!r})"


@dataclass
class _Forwarded:
    """What one step's forwards gave a job: velocities by branch, the last layer's outputs of
    its TaylorSeer branches that ran, and how many jobs shared its forward (0: it ran none)."""

    velocities: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    shared: int = 0


class DiT:
    """Generation side of BAGEL. Needs the `und`, `gen` and `gen_heads` parts and a VAE; with
    `vit` it can build edit contexts on its own (`builder`)."""

    def __init__(self, model: BagelModel, tokenizer: BagelTokenizer, vae: AutoEncoder, cuda_graphs: bool = True) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.vae = vae
        self.builder = ContextBuilder(model, tokenizer, vae)
        self.cfg = model.cfg
        self.cuda_graphs = cuda_graphs  # on a GPU, small forwards replay their layers as graphs
        self._graphs = DitGraphs(model.llm)
        self._marker_rows: torch.Tensor | None = None

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        step = self.cfg.latent_downsample
        if height % step or width % step:
            raise ValueError(f"image size {height}x{width} must be a multiple of {step}")
        h, w = height // step, width // step
        if max(h, w) > self.cfg.max_latent_size:
            raise ValueError(f"image size {height}x{width} exceeds the largest side {self.cfg.max_image_side}")
        return h, w

    def initial_noise(self, height: int, width: int, generator: torch.Generator | None) -> torch.Tensor:
        """randn(h*w, 64) in fp32 on the CPU, in token layout (spec 6.2 and 11.8)."""
        h, w = self.latent_grid(height, width)
        return torch.randn(h * w, self.cfg.patch_latent_dim, generator=generator, dtype=torch.float32)

    def markers(self) -> torch.Tensor:
        """The two marker rows of an image block (for a rank of `dit_parallel` that builds its
        own share of the block)."""
        return self._markers()

    def _markers(self) -> torch.Tensor:
        """The embedded <|vision_start|> and <|vision_end|> rows that open and close every image
        block: the same for every step of every request, so embedded once."""
        if self._marker_rows is None:
            tok = self.tokenizer
            self._marker_rows = self.model.embed_tokens(torch.tensor([tok.start_of_image, tok.end_of_image],
                                                                     device=self.model.device))
        return self._marker_rows

    @torch.inference_mode()
    def velocities(self, x: torch.Tensor, t: torch.Tensor, contexts: list[KVContext], pos_ids: torch.Tensor,
                   with_stream: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """v for each context in one batched forward: [B, h*w, 64]. Row block b is the latent
        block `x[b]` ([B, h*w, 64]) at time `t[b]` ([B]) over `contexts[b]`; a [h*w, 64] x or a
        0-dim t is shared by every block. The linear layers run on all blocks' rows together;
        attention runs per block over its own context. `with_stream` adds the latent rows of
        the residual stream after the last layer (before the final norm) [B, h*w, D], what
        TaylorSeer keeps: (v, stream). The stream may be a CUDA graph's own tensor: copy what
        is needed of it before the next forward."""
        dev = self.model.device
        B = len(contexts)
        markers = self._markers()
        x = x.to(dev)
        x = x.expand(B, *x.shape) if x.dim() == 2 else x
        n_lat = x.shape[1]
        t = t.to(dev).reshape(-1).expand(B)
        latents = self.model.latent_embeds(x.reshape(B * n_lat, -1), t.repeat_interleave(n_lat), pos_ids.repeat(B))
        start, end = markers[:1].expand(B, 1, -1), markers[1:].expand(B, 1, -1)
        rows = torch.cat((start, latents.view(B, n_lat, -1).to(markers.dtype), end), dim=1)
        n = n_lat + 2
        positions = host_to_device([c.rope for c in contexts], dev)[:, None].expand(B, n)
        past = [[c.layer(i) for i in range(c.kv.shape[0])] if c.length else None for c in contexts]
        stream, hidden = self.layers(rows, positions, ExpertRows.block_markers(B, n, dev), RaggedKV(past))
        v = self.model.velocity(hidden[:, 1:-1])
        return (v, stream[:, 1:-1]) if with_stream else v

    def layers(self, rows: torch.Tensor, positions: torch.Tensor, experts: ExpertRows, attention: BlockAttention,
               tag: tuple = (), graphs: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder layers over image blocks `rows` [B, N, D] in gen mode: (the residual
        stream after the last layer, the final-normed hidden states), replayed as CUDA graphs
        where `graphs` (default: `cuda_graphs`) is on and the shape fits (`DitGraphs`), else
        eagerly. `attention`: `RaggedKV`, or a parallel replica's split attention
        (`UlyssesKV`); `tag`: what `experts` depends on besides the shape (a sequence rank's
        markers). Graph outputs are the graphs' own tensors: read them before the next call."""
        if self.cuda_graphs if graphs is None else graphs:
            return self._graphs(rows, positions, experts, attention, ForwardMode(gen=True), tag)
        hidden, _, stream = self.model.llm(rows, positions, experts, attention, ForwardMode(gen=True), with_stream=True)
        return stream, hidden

    @torch.inference_mode()
    def predicted_velocity(self, state: TaylorState) -> torch.Tensor:
        """A TaylorSeer forward of one branch: the final norm of the gen rows (`norm_moe_gen`)
        and `llm2vae` over the cache's prediction of the last layer's output [h*w, 64]. No
        layer runs: a predicted layer ignores its input, so the last one's prediction is all
        that reaches the output."""
        return self.model.velocity(self.model.llm.norm_moe_gen(state.predict()))

    def job(
        self,
        contexts: ImageContexts,
        params: DenoiseParams,
        noise: torch.Tensor,
        on_step: Callable[[StepRecord], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        key: object = None,
    ) -> DenoiseJob:
        """A denoising job from `noise` [h*w, 64] (fp32), ready for `step`. Checks the size and
        the noise here, so that a bad request fails on its own, before it joins a batch."""
        h, w = self.latent_grid(contexts.height, contexts.width)
        if tuple(noise.shape) != (h * w, self.cfg.patch_latent_dim):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {(h * w, self.cfg.patch_latent_dim)}")
        schedule = make_schedule(params.num_inference_steps, params.timestep_shift)
        dev = self.model.device
        return DenoiseJob(
            contexts, params, (h, w), schedule, schedule.timesteps.to(dev), schedule.dts.to(dev),
            {name: contexts.branch(name) for name in BRANCHES}, grid_position_ids(h, w, self.cfg.max_latent_size).to(dev),
            noise.to(dev, torch.float32),  # the latent state stays on the device, in fp32
            on_step, should_stop, key,
            taylor={name: TaylorState() for name in BRANCHES} if params.taylorseer else None,
        )

    @staticmethod
    def _stops(job: DenoiseJob) -> bool:
        """Ask the job's `should_stop` (a host-side flag: no device sync); yes ends it."""
        if job.should_stop is not None and job.should_stop():
            job.error = Cancelled(f"denoising stopped before step {job.index + 1} of {job.total}: the request was cancelled")
        return job.error is not None

    @staticmethod
    def _guidance(job: DenoiseJob) -> tuple[float, float, list[str], list[str]]:
        """`guidance` of a job's current step."""
        return guidance(job.params, job.schedule.timesteps[job.index], job.contexts.same_as_gen, job.taylor)

    def _batched_velocities(self, jobs: list[DenoiseJob], runs: list[list[str]]) -> list[_Forwarded]:
        """Each job's velocities of the branches in its `runs` entry, with one forward per
        latent grid over every (job, branch) block of that grid, and how many jobs shared it.
        A TaylorSeer job also gets its copy of each such branch's last-layer output, for its
        cache (written over the cache's spare factor when it has one). No job's state changes
        here, so a forward that raises leaves every job as it was."""
        groups: dict[tuple[int, int], list[int]] = {}
        for k, job in enumerate(jobs):
            if runs[k]:
                groups.setdefault(job.grid, []).append(k)
        out = [_Forwarded() for _ in jobs]
        for members in groups.values():
            blocks = [(k, b) for k in members for b in runs[k]]
            x = torch.stack([jobs[k].x for k, _ in blocks])
            t = torch.stack([jobs[k].timesteps[jobs[k].index] for k, _ in blocks])
            v, stream = self.velocities(x, t, [jobs[k].branches[b] for k, b in blocks], jobs[members[0]].pos_ids,
                                        with_stream=True)
            for row, (k, b) in enumerate(blocks):
                out[k].velocities[b] = v[row]
                taylor = jobs[k].taylor
                if taylor is not None:
                    out[k].outputs[b] = taylor[b].keep(stream[row])
            for k in members:
                out[k].shared = len(members)
        return out

    @torch.inference_mode()
    def step(self, jobs: Sequence[DenoiseJob]) -> None:
        """Advance every unfinished job by one step of its own schedule.

        The (job, branch) blocks of all jobs with the same latent grid run as one forward
        (`velocities`), but for the TaylorSeer forwards, whose velocities come from the job's
        cache (`predicted_velocity`); then each job combines its own branches and takes its
        Euler step. A job whose `should_stop` says yes ends with `Cancelled` before its
        forward, one whose `on_step` raises ends with that exception; the others go on. Every
        forward runs before any job changes, so when a forward raises (out of memory, say) no
        job has moved and the caller may retry them, e.g. fewer at a time."""
        live = [job for job in jobs if not job.done and not self._stops(job)]
        if not live:
            return
        plans = [self._guidance(job) for job in live]
        forwards = [[b for b in run if job.taylor is None or job.taylor[b].next_is_full]
                    for job, (*_, run) in zip(live, plans)]
        outs = self._batched_velocities(live, forwards)
        for job, (*_, run), out in zip(live, plans, outs):
            for b in run:
                if b not in out.velocities:
                    out.velocities[b] = self.predicted_velocity(job.taylor[b])
        for job, (s_t, s_i, wanted, _), ran, out in zip(live, plans, forwards, outs):
            v = out.velocities
            try:
                if job.taylor is not None:
                    for b in wanted:  # a reused branch counts its forward too, keeping no factors
                        job.taylor[b].advance(out.outputs.get(b))
                for b in wanted:
                    v.setdefault(b, v["cond"])
                p = job.params
                guided = combine(v["cond"], v.get("cfg_text"), v.get("cfg_img"), s_t, s_i, p.cfg_renorm_type, p.cfg_renorm_min)
                if job.on_step is not None:
                    t = float(job.schedule.timesteps[job.index])
                    job.on_step(StepRecord(job.index, job.total, t, job.x, v, guided, out.shared, tuple(ran)))
                job.x = euler_step(job.x, guided, job.dts[job.index])
                job.index += 1
            except Exception as exc:  # this job's own failure (its callback, say): the others go on
                job.error = exc

    @torch.inference_mode()
    def denoise(
        self,
        contexts: ImageContexts,
        params: DenoiseParams,
        noise: torch.Tensor,
        on_step: Callable[[StepRecord], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """Run the sampler from `noise` [h*w, 64] (fp32) and return the final latent tokens: one
        job stepped alone. Raises `Cancelled` when `should_stop` says yes before a step, and
        what `on_step` raises."""
        job = self.job(contexts, params, noise, on_step, should_stop)
        while not job.done:
            self.step([job])
        if job.error is not None:
            raise job.error
        return job.x

    @torch.inference_mode()
    def decode_image(self, tokens: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, Image.Image]:
        """Latent tokens -> (raw decoder output [1, 3, H, W], PIL image)."""
        h, w = self.latent_grid(height, width)
        vae_param = next(self.vae.parameters())
        latent = tokens_to_latent(tokens, h, w, self.cfg.latent_patch_size, self.cfg.latent_channels)
        decoded = self.vae.decode(latent.to(vae_param.device, vae_param.dtype))
        return decoded, decoded_to_pil(decoded.float())
