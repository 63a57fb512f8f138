"""`LocalPipeline`: the Thinker and the DiT composed in one process, as the official
`InterleaveInferencer` drives the model (spec 6.1, 7). It is the reference that the
distributed path must match bit for bit, so the composition is split into the two halves
the serving layer runs on different replicas: `build_contexts` (Thinker side) and
`render` (DiT side).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from bagel_ray.engine.context import GEN_THINK_SYSTEM_PROMPT, VLM_THINK_SYSTEM_PROMPT
from bagel_ray.engine.dit import DiT, StepRecord
from bagel_ray.engine.kv_context import ImageContexts
from bagel_ray.engine.request import DEFAULT_SIZE, GenerationRequest, GenerationResult
from bagel_ray.engine.thinker import Thinker
from bagel_ray.model.bagel import ALL_PARTS
from bagel_ray.model.image_transforms import resize, to_rgb
from bagel_ray.model.loader import load_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class PreparedImage:
    """What the Thinker side hands to the DiT side for one image request."""

    contexts: ImageContexts
    noise: torch.Tensor
    think_text: str | None
    think_token_ids: list[int] | None
    timings: dict[str, float]


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class LocalPipeline:
    def __init__(self, thinker: Thinker, dit: DiT | None) -> None:
        self.thinker = thinker
        self.dit = dit
        self.cfg = thinker.model.cfg

    @classmethod
    def from_pretrained(cls, model: str | Path = "tiny", device: str = "cpu", dtype: str | torch.dtype = "bfloat16") -> "LocalPipeline":
        """Load every part once and share it between the two engines."""
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        ckpt = load_checkpoint(model, ALL_PARTS, device=device, dtype=dtype)
        return cls(Thinker(ckpt.model, ckpt.tokenizer, ckpt.vae), DiT(ckpt.model, ckpt.tokenizer, ckpt.vae))

    # -- Thinker side -------------------------------------------------------------------

    def vae_resized(self, image: Image.Image) -> Image.Image:
        """Every input image is first resized by the VAE rule, even for understanding (spec 4.1)."""
        return resize(to_rgb(image), self.cfg.vae_transform)

    def understand(self, req: GenerationRequest) -> GenerationResult:
        """text2text and img2text: [sys] [ViT image] prompt, then decode."""
        return self.understand_batch([req])[0]

    def understand_batch(self, reqs: list[GenerationRequest]) -> list[GenerationResult]:
        """Several text requests with one batched decode. Sampling settings come from the first
        request (the serving layer groups requests that share them)."""
        t0 = time.perf_counter()
        contexts = []
        for req in reqs:
            ctx = self.thinker.empty()
            if req.think:
                ctx = self.thinker.append_text(ctx, VLM_THINK_SYSTEM_PROMPT)
            if req.image is not None:
                ctx = self.thinker.append_vit(ctx, self.vae_resized(req.image))
            contexts.append(self.thinker.append_text(ctx, req.prompt))
        t1 = time.perf_counter()
        first = reqs[0]
        outs = self.thinker.decode(contexts, first.decode_params(), _seeded(first.seed))
        t2 = time.perf_counter()
        return [
            GenerationResult(req.modality, req.prompt, req.seed, text=o.text, token_ids=o.token_ids,
                             timings={"prefill_s": t1 - t0, "decode_s": t2 - t1, "tokens": float(len(o.token_ids))})
            for req, o in zip(reqs, outs)
        ]

    def build_contexts(self, req: GenerationRequest, generator: torch.Generator) -> tuple[ImageContexts, str | None, list[int] | None]:
        """The three CFG contexts of text2img / img2img (spec 6.1 table), think text included."""
        th = self.thinker
        gen, cfg_img = th.empty(), th.empty()
        if req.think:
            gen = th.append_text(gen, GEN_THINK_SYSTEM_PROMPT)
            cfg_img = gen
        if req.modality == "img2img":
            image = self.vae_resized(req.image)
            height, width = image.height, image.width
            gen = th.append_vae(gen, image, generator)
            gen = th.append_vit(gen, image)
        else:
            height, width = req.height or DEFAULT_SIZE, req.width or DEFAULT_SIZE
        cfg_text = gen.cut
        gen = th.append_text(gen, req.prompt)
        cfg_img = gen.cut if req.modality == "text2img" else th.append_text(cfg_img, req.prompt)
        think_text = think_ids = None
        if req.think:
            out = th.decode([gen], req.decode_params(think=True), _seeded(req.seed))[0]
            think_text, think_ids = out.text, out.token_ids
            gen = th.append_text(gen, think_text)
        return ImageContexts(gen, cfg_text, cfg_img, height, width), think_text, think_ids

    def prepare_image(self, req: GenerationRequest) -> PreparedImage:
        """Contexts and initial noise. The seeded CPU generator gives the VAE posterior draw
        first (edits), then the noise, as the official order (spec 11.8)."""
        t0 = time.perf_counter()
        generator = _seeded(req.seed)
        contexts, think_text, think_ids = self.build_contexts(req, generator)
        if req.init_noise is not None:
            noise = req.init_noise
        else:
            step = self.cfg.latent_downsample
            noise = torch.randn((contexts.height // step) * (contexts.width // step), self.cfg.patch_latent_dim,
                                generator=generator, dtype=torch.float32)
        return PreparedImage(contexts, noise, think_text, think_ids, {"prefill_s": time.perf_counter() - t0})

    # -- DiT side -----------------------------------------------------------------------

    def render(self, req: GenerationRequest, prepared: PreparedImage,
               on_step: Callable[[StepRecord], None] | None = None) -> GenerationResult:
        if self.dit is None:
            raise RuntimeError("this pipeline has no DiT engine")
        ctx = prepared.contexts
        t0 = time.perf_counter()
        tokens = self.dit.denoise(ctx, req.sampler(), prepared.noise, on_step)
        t1 = time.perf_counter()
        _, image = self.dit.decode_image(tokens, ctx.height, ctx.width)
        t2 = time.perf_counter()
        timings = dict(prepared.timings, denoise_s=t1 - t0, vae_decode_s=t2 - t1)
        return GenerationResult(req.modality, req.prompt, req.seed, think_text=prepared.think_text,
                                think_token_ids=prepared.think_token_ids, image=image, latent_tokens=tokens, timings=timings)

    # -- both ---------------------------------------------------------------------------

    def run(self, req: GenerationRequest, on_step: Callable[[StepRecord], None] | None = None) -> GenerationResult:
        if req.outputs_image:
            return self.render(req, self.prepare_image(req), on_step)
        return self.understand(req)
