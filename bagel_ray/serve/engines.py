"""What builds the Serve stages' engines from the app config: the device and dtype a stage
resolves to, the model parts it loads, and the engine factories (`EngineFactory`) the
deployments of `stages.py` take at bind time (`engine=`), plus the denoiser a worker rank of a
parallel DiT replica builds (`rank_dit`, for `dit_group.py`). Kept apart from the deployments
so that they stay shells over an injected engine (as Ray Serve LLM's `LLMServer` takes its
`engine_cls`), and so that what a stage loads is read in one place by the deployments, the
worker ranks and `benchmarks/time_to_ready.py` alike.
"""

from __future__ import annotations

from typing import Callable

import torch

from bagel_ray.engine.dit import DiT
from bagel_ray.engine.pipeline import DTYPES, LocalPipeline
from bagel_ray.engine.thinker import Thinker
from bagel_ray.model.loader import load_checkpoint
from bagel_ray.routes import DIT, THINKER, stage_parts
from bagel_ray.serve.config import AppConfig, StageConfig

# An engine factory: the validated app config in, the stage's pipeline out. Module-level
# functions (picklable) are passed to a deployment's bind as `engine=`.
EngineFactory = Callable[[AppConfig], LocalPipeline]


def resolve_device(stage: StageConfig) -> tuple[str, torch.dtype]:
    """The stage's device and dtype, `auto` resolved (CUDA and bfloat16 where this process has
    a GPU, else the CPU and float32); on CUDA this process's share of the card is capped at
    `gpu_memory_utilization`, since replicas of both stages may share one GPU."""
    device = stage.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = stage.dtype if stage.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    if device == "cuda":
        torch.cuda.set_per_process_memory_fraction(stage.gpu_memory_utilization)
    return device, DTYPES[dtype]


def thinker_parts(app: AppConfig) -> frozenset[str]:
    """The model parts the Thinker stage loads: the routing table's (`bagel_ray.routes`)."""
    return stage_parts(THINKER, app.edit_contexts_on)


def dit_parts(app: AppConfig) -> frozenset[str]:
    """The model parts the DiT stage (each rank of it) loads: the routing table's."""
    return stage_parts(DIT, app.edit_contexts_on)


def rank_dit(config: AppConfig) -> DiT:
    """A worker rank's denoiser (`serve/dit_group.py`). It only denoises, but it loads what rank 0
    loads: `random-7b` draws its weights in parameter order from one seed, so other parts would
    give it other weights. On a GPU its layers replay as CUDA graphs between the split
    attentions where `dit.parallel.cuda_graphs` is on, as rank 0's do (`ParallelDiT`)."""
    device, dtype = resolve_device(config.dit)
    ckpt = load_checkpoint(config.model, dit_parts(config), device, dtype)
    return DiT(ckpt.model, ckpt.tokenizer, ckpt.vae)


def thinker_engine(config: AppConfig) -> LocalPipeline:
    """The Thinker replica's engine: the understanding parts of the configured checkpoint."""
    device, dtype = resolve_device(config.thinker)
    ckpt = load_checkpoint(config.model, thinker_parts(config), device, dtype)
    return LocalPipeline(Thinker(ckpt.model, ckpt.tokenizer, ckpt.vae), None)


def dit_engine(config: AppConfig) -> LocalPipeline:
    """The DiT replica's engine: the denoiser and VAE (and the Thinker side when this stage
    builds img2img contexts itself)."""
    device, dtype = resolve_device(config.dit)
    ckpt = load_checkpoint(config.model, dit_parts(config), device, dtype)
    thinker = Thinker(ckpt.model, ckpt.tokenizer, ckpt.vae) if config.edit_contexts_on == "dit" else None
    return LocalPipeline(thinker, DiT(ckpt.model, ckpt.tokenizer, ckpt.vae))
