"""The DiT engine: flow-matching denoising with CFG over KV contexts, and VAE decode
(spec 6.2-6.4).

Each step builds one query block `[<|vision_start|>] + latents + [<|vision_end|>]` (latents on
the gen expert, markers on und, all at the branch's next position) and runs it over each
active branch's cached context without caching it. The active branches of a step run as one
batched forward; a branch whose context equals gen's (text2img's cfg_img without think) is
not run, its velocity is the conditional one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image

from bagel_ray.engine.cfg import RENORM_TYPES, combine
from bagel_ray.engine.context import ContextBuilder
from bagel_ray.engine.kv_context import ImageContexts, KVContext
from bagel_ray.engine.schedule import cfg_active, euler_step, make_schedule
from bagel_ray.model.bagel import BagelModel
from bagel_ray.model.image_transforms import decoded_to_pil, grid_position_ids, tokens_to_latent
from bagel_ray.model.llm import ExpertRows, ForwardMode, RaggedKV
from bagel_ray.model.tokenizer import BagelTokenizer
from bagel_ray.model.vae import AutoEncoder

BRANCHES = ("cond", "cfg_text", "cfg_img")


@dataclass(frozen=True)
class DenoiseParams:
    """Sampler knobs with the official notebook text2img defaults."""

    num_timesteps: int = 50
    timestep_shift: float = 3.0
    cfg_text_scale: float = 4.0
    cfg_img_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    cfg_renorm_type: str = "global"
    cfg_renorm_min: float = 0.0

    def __post_init__(self) -> None:
        if self.num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {self.num_timesteps}")
        if not math.isfinite(self.timestep_shift) or self.timestep_shift <= 0:
            raise ValueError(f"timestep_shift must be a finite number > 0, got {self.timestep_shift}")
        if self.cfg_renorm_type not in RENORM_TYPES:
            raise ValueError(f"cfg_renorm_type must be one of {RENORM_TYPES}, got {self.cfg_renorm_type!r}")
        lo, hi = self.cfg_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"cfg_interval must satisfy 0 <= lo <= hi <= 1, got {self.cfg_interval}")
        if not 0.0 <= self.cfg_renorm_min <= 1.0:
            raise ValueError(f"cfg_renorm_min must be in [0, 1], got {self.cfg_renorm_min}")


@dataclass(frozen=True)
class StepRecord:
    """What one denoising step did, for progress bars, stats and tests."""

    index: int
    total: int
    t: float
    x: torch.Tensor  # latent tokens before the update
    velocities: dict[str, torch.Tensor]  # per branch that ran (or was reused)
    guided: torch.Tensor


class DiT:
    """Generation side of BAGEL. Needs the `und`, `gen` and `gen_heads` parts and a VAE; with
    `vit` it can build edit contexts on its own (`builder`)."""

    def __init__(self, model: BagelModel, tokenizer: BagelTokenizer, vae: AutoEncoder) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.vae = vae
        self.builder = ContextBuilder(model, tokenizer, vae)
        self.cfg = model.cfg

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

    def _markers(self) -> torch.Tensor:
        tok = self.tokenizer
        return self.model.embed_tokens(torch.tensor([tok.start_of_image, tok.end_of_image], device=self.model.device))

    @torch.inference_mode()
    def velocities(self, x: torch.Tensor, t: torch.Tensor, contexts: list[KVContext], pos_ids: torch.Tensor,
                   markers: torch.Tensor | None = None) -> torch.Tensor:
        """v for each context in one batched forward: [B, h*w, 64]. The linear layers run on
        all branches' rows together; attention runs per branch over its own context."""
        dev = self.model.device
        markers = self._markers() if markers is None else markers
        latents = self.model.latent_embeds(x.to(dev), t.to(dev).expand(x.shape[0]), pos_ids)
        rows = torch.cat((markers[:1], latents.to(markers.dtype), markers[1:]))
        n, B = rows.shape[0], len(contexts)
        positions = torch.tensor([c.rope for c in contexts], device=dev)[:, None].expand(B, n)
        past = [[c.layer(i) for i in range(c.kv.shape[0])] if c.length else None for c in contexts]
        hidden, _ = self.model.llm(rows[None].expand(B, -1, -1), positions, ExpertRows.block_markers(B, n, dev),
                                   RaggedKV(past), ForwardMode(gen=True))
        return self.model.velocity(hidden[:, 1:-1])

    @torch.inference_mode()
    def denoise(
        self,
        contexts: ImageContexts,
        params: DenoiseParams,
        noise: torch.Tensor,
        on_step: Callable[[StepRecord], None] | None = None,
    ) -> torch.Tensor:
        """Run the sampler from `noise` [h*w, 64] (fp32) and return the final latent tokens."""
        h, w = self.latent_grid(contexts.height, contexts.width)
        if tuple(noise.shape) != (h * w, self.cfg.patch_latent_dim):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {(h * w, self.cfg.patch_latent_dim)}")
        schedule = make_schedule(params.num_timesteps, params.timestep_shift)
        dev = self.model.device
        pos_ids = grid_position_ids(h, w, self.cfg.max_latent_size).to(dev)
        branch_ctx = {name: contexts.branch(name) for name in BRANCHES}
        markers = self._markers()
        # the schedule is read on the host (gating) and used on the device (no per-step copies)
        timesteps_dev, dts_dev = schedule.timesteps.to(dev), schedule.dts.to(dev)
        x = noise.to(dev, torch.float32)  # the latent state stays on the device, in fp32
        for i in range(len(schedule)):
            t = schedule.timesteps[i]
            on = cfg_active(t, params.cfg_interval)
            s_t = params.cfg_text_scale if on else 1.0
            s_i = params.cfg_img_scale if on else 1.0
            wanted = ["cond"] + (["cfg_text"] if s_t > 1.0 else []) + (["cfg_img"] if s_t > 1.0 and s_i > 1.0 else [])
            run = [b for b in wanted if b == "cond" or not contexts.same_as_gen(b)]
            out = self.velocities(x, timesteps_dev[i], [branch_ctx[b] for b in run], pos_ids, markers)
            v = {b: out[k] for k, b in enumerate(run)}
            for b in wanted:
                v.setdefault(b, v["cond"])
            guided = combine(v["cond"], v.get("cfg_text"), v.get("cfg_img"), s_t, s_i, params.cfg_renorm_type, params.cfg_renorm_min)
            if on_step is not None:
                on_step(StepRecord(i, len(schedule), float(t), x, v, guided))
            x = euler_step(x, guided, dts_dev[i])
        return x

    @torch.inference_mode()
    def decode_image(self, tokens: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, Image.Image]:
        """Latent tokens -> (raw decoder output [1, 3, H, W], PIL image)."""
        h, w = self.latent_grid(height, width)
        vae_param = next(self.vae.parameters())
        latent = tokens_to_latent(tokens, h, w, self.cfg.latent_patch_size, self.cfg.latent_channels)
        decoded = self.vae.decode(latent.to(vae_param.device, vae_param.dtype))
        return decoded, decoded_to_pil(decoded.float())
