"""`LocalPipeline`: the Thinker and the DiT composed in one process, as the official
`InterleaveInferencer` drives the model (spec 6.1, 7). It is the reference that the
distributed path must match bit for bit, so the composition is split into the two halves
the serving layer runs on different replicas: `build_contexts` (Thinker side) and
`render` (DiT side).
"""

from __future__ import annotations

import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image

from bagel_ray.engine.cancel import Cancelled
from bagel_ray.engine.context import GEN_THINK_SYSTEM_PROMPT, VLM_THINK_SYSTEM_PROMPT
from bagel_ray.engine.dit import DiT, StepRecord
from bagel_ray.engine.errors import PromptTooLong
from bagel_ray.engine.kv_context import ImageContexts, KVContext
from bagel_ray.engine.request import GenerationRequest, GenerationResult
from bagel_ray.engine.thinker import Thinker
from bagel_ray.knobs import DEFAULT_SIZE
from bagel_ray.model.bagel import ALL_PARTS
from bagel_ray.model.image_transforms import resize, to_rgb
from bagel_ray.model.loader import load_checkpoint
from bagel_ray.model.tokenizer import clean_generated_text

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class PreparedImage:
    """What the Thinker side hands to the DiT side for one image request. `noise` is made on
    the side that denoises (`initial_noise`): a Thinker replica leaves it None."""

    contexts: ImageContexts
    noise: torch.Tensor | None
    think_text: str | None
    think_token_ids: list[int] | None
    timings: dict[str, float]


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class LocalPipeline:
    def __init__(self, thinker: Thinker | None, dit: DiT | None, max_model_len: int | None = None) -> None:
        """Either engine may be absent: a Thinker replica holds only the Thinker side, a DiT
        replica only the DiT side (or both, when it builds edit contexts itself).
        `max_model_len`: the most tokens a request's text plus the tokens it may decode may
        use; a request past it raises `PromptTooLong` before any model work (None: no limit)."""
        if thinker is None and dit is None:
            raise ValueError("a pipeline needs at least one engine")
        self.thinker = thinker
        self.dit = dit
        self.cfg = (thinker or dit).model.cfg
        self.max_model_len = max_model_len
        self._system_tokens: dict[str, int] = {}

    @property
    def thinker_engine(self) -> Thinker:
        if self.thinker is None:
            raise RuntimeError("this pipeline has no Thinker engine")
        return self.thinker

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
        result = self.understand_batch([req])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def prompt_tokens(self, req: GenerationRequest) -> list[int]:
        """The prompt's text segment, tokenized once (here, where a request's tokens are made)
        and checked against `max_model_len`: the prompt, with the think system prompt when
        thinking, plus the tokens the request may decode (`max_tokens` for a text answer,
        `max_think_tokens` for an image with think) must fit. Input images are not counted:
        the image resize bounds their tokens. Raises `PromptTooLong` naming the field."""
        th = self.thinker_engine
        segment = th.tokenizer.text_segment(req.prompt)
        limit = self.max_model_len
        if limit is None:
            return segment
        used = len(segment) + sum(len(th.tokenizer.text_segment(item)) for item in req.context if isinstance(item, str))
        if req.think:
            system = GEN_THINK_SYSTEM_PROMPT if req.outputs_image else VLM_THINK_SYSTEM_PROMPT
            if system not in self._system_tokens:
                self._system_tokens[system] = len(th.tokenizer.text_segment(system))
            used += self._system_tokens[system]
        if req.outputs_image:
            new_field, new_tokens = ("max_think_tokens", req.max_think_tokens) if req.think else (None, 0)
        else:
            new_field, new_tokens = "max_tokens", req.max_tokens
        if used > limit:
            raise PromptTooLong(f"the prompt is {used} tokens, more than max_model_len ({limit})", "prompt")
        if used + new_tokens > limit:
            raise PromptTooLong(f"the prompt ({used} tokens) plus {new_field}={new_tokens} exceeds max_model_len "
                                f"({limit}); lower {new_field} to at most {limit - used}", new_field)
        return segment

    def understanding_context(self, req: GenerationRequest, prompt: list[int] | None = None) -> KVContext:
        """[sys] [ViT image] prompt: the context text answers decode from. `prompt`: the
        request's `prompt_tokens`, when already made."""
        th = self.thinker_engine
        prompt = self.prompt_tokens(req) if prompt is None else prompt
        ctx = th.empty()
        if req.think:
            ctx = th.append_text(ctx, VLM_THINK_SYSTEM_PROMPT)
        for item in req.inputs:
            ctx = th.append_text(ctx, item) if isinstance(item, str) else th.append_vit(ctx, self.vae_resized(item))
        return th.append_tokens(ctx, prompt)

    def understanding_contexts(self, reqs: list[GenerationRequest],
                               prompts: list[list[int]] | None = None) -> list[KVContext]:
        """`understanding_context` of each request. The plain ones (no image, no think) are just
        their prompt, so they are prefilled together, in one forward (`append_tokens_batch`)
        instead of one each; the others are built one by one. Every prompt is checked before
        any is prefilled (`prompts`: their `prompt_tokens`, when already made)."""
        th = self.thinker_engine
        prompts = [self.prompt_tokens(req) for req in reqs] if prompts is None else prompts
        plain = [i for i, req in enumerate(reqs) if not req.inputs and not req.think]
        built = th.builder.append_tokens_batch([th.empty() for _ in plain], [prompts[i] for i in plain])
        contexts = dict(zip(plain, built))
        return [contexts[i] if i in contexts else self.understanding_context(req, prompts[i]) for i, req in enumerate(reqs)]

    def understand_stream(self, req: GenerationRequest,
                          prompt: list[int] | None = None) -> Iterator[str | GenerationResult]:
        """Text deltas as they decode, then the full result as the last item."""
        th = self.thinker_engine
        t0 = time.perf_counter()
        ctx = self.understanding_context(req, prompt)
        t1 = time.perf_counter()
        ids: list[int] = []
        sent, stopped = "", False
        # closed with this stream, also when its consumer stops early: the engine's decoder is free again
        with closing(th.decode_steps([ctx], req.decode_params(), _seeded(req.seed))) as steps:
            for step in steps:
                stopped = stopped or step.stopped[0]
                if step.tokens[0] is None:
                    continue
                ids.append(step.tokens[0])
                text = th.tokenizer.decode(ids)
                if not text.endswith("\ufffd") and len(text) > len(sent):  # hold back a split UTF-8 char
                    yield text[len(sent):]
                    sent = text
        final = clean_generated_text(th.tokenizer.decode([th.tokenizer.bos_id] + ids))
        if len(final) > len(sent) and final.startswith(sent):
            yield final[len(sent):]
        yield GenerationResult(req.modality, req.prompt, req.seed, text=final, token_ids=ids,
                               finish_reason="stop" if stopped else "length", prompt_tokens=ctx.length,
                               timings={"prefill_s": t1 - t0, "decode_s": time.perf_counter() - t1, "tokens": float(len(ids))})

    def understand_batch(self, reqs: list[GenerationRequest], should_stop: Callable[[int], bool] | None = None,
                         prompts: list[list[int]] | None = None) -> list[GenerationResult | Exception | None]:
        """Several text requests. Greedy requests with the same decoding settings share one
        batched decode; sampled ones decode alone, so a seed gives the same text whatever
        else is in the batch. `should_stop(i)` says request i no longer wants its result: a
        group all of whose requests say so stops at its next step and gets None results. A
        request too long for `max_model_len` gets its `PromptTooLong` as its result, alone.
        `prompts`: the requests' `prompt_tokens`, when already made."""
        th = self.thinker_engine
        results: list[GenerationResult | Exception | None] = [None] * len(reqs)
        made: dict[int, list[int]] = {}
        groups: dict[object, list[int]] = {}
        for i, req in enumerate(reqs):
            try:
                made[i] = self.prompt_tokens(req) if prompts is None else prompts[i]
            except PromptTooLong as exc:
                results[i] = exc
                continue
            key = ("sampled", i) if req.do_sample else req.decode_params()
            groups.setdefault(key, []).append(i)
        for members in groups.values():
            stop = None if should_stop is None else (lambda members=members: all(should_stop(i) for i in members))
            if stop is not None and stop():
                continue
            t0 = time.perf_counter()
            contexts = [self.understanding_context(reqs[i], made[i]) for i in members]
            t1 = time.perf_counter()
            first = reqs[members[0]]
            try:
                outs = th.decode(contexts, first.decode_params(), _seeded(first.seed), should_stop=stop)
            except Cancelled:
                continue
            t2 = time.perf_counter()
            for i, ctx, out in zip(members, contexts, outs):
                req = reqs[i]
                results[i] = GenerationResult(
                    req.modality, req.prompt, req.seed, text=out.text, token_ids=out.token_ids,
                    finish_reason="stop" if out.stopped_on_eos else "length", prompt_tokens=ctx.length,
                    timings={"prefill_s": t1 - t0, "decode_s": t2 - t1, "tokens": float(len(out.token_ids))},
                )
        return results

    def build_contexts(self, req: GenerationRequest, generator: torch.Generator,
                       should_stop: Callable[[], bool] | None = None,
                       prompt: list[int] | None = None) -> tuple[ImageContexts, str | None, list[int] | None]:
        """The three CFG contexts of text2img / img2img (spec 6.1 table), think text included
        (its decoding raises `Cancelled` when `should_stop` says yes). `prompt`: the request's
        `prompt_tokens`, when already made."""
        if req.image_in_contexts:
            raise ValueError("this edit request's image went into contexts built elsewhere (for_render)")
        th = self.thinker_engine
        prompt = self.prompt_tokens(req) if prompt is None else prompt
        gen, cfg_img = th.empty(), th.empty()
        if req.think:
            gen = th.append_text(gen, GEN_THINK_SYSTEM_PROMPT)
        default = min(DEFAULT_SIZE, self.cfg.max_image_side)
        height, width = req.height or default, req.width or default
        text_only = True  # cfg_img is gen's text, so a cut of gen until the first image
        for item in req.inputs:
            if isinstance(item, str):
                gen = th.append_text(gen, item)
                if not text_only:
                    cfg_img = th.append_text(cfg_img, item)
                continue
            if text_only:
                cfg_img, text_only = gen, False
            image = self.vae_resized(item)
            height, width = image.height, image.width  # the output takes the last input image's size
            gen = th.append_vae(gen, image, generator)
            gen = th.append_vit(gen, image)
        cfg_text = gen.cut
        gen = th.append_tokens(gen, prompt)
        cfg_img = gen.cut if text_only else th.append_tokens(cfg_img, prompt)
        think_text = think_ids = None
        if req.think:
            out = th.decode([gen], req.decode_params(think=True), _seeded(req.seed), should_stop=should_stop)[0]
            think_text, think_ids = out.text, out.token_ids
            gen = th.append_text(gen, think_text)
        return ImageContexts(gen, cfg_text, cfg_img, height, width), think_text, think_ids

    def prepare_image(self, req: GenerationRequest, should_stop: Callable[[], bool] | None = None,
                      prompt: list[int] | None = None, noise: bool = True) -> PreparedImage:
        """Contexts and initial noise. The seeded CPU generator gives the VAE posterior draw
        first (edits), then the noise, as the official order (spec 11.8). `noise=False`: the
        contexts only, for a stage that hands them on (the DiT makes the noise itself)."""
        t0 = time.perf_counter()
        generator = _seeded(req.seed)
        contexts, think_text, think_ids = self.build_contexts(req, generator, should_stop, prompt)
        made = self.initial_noise(req, contexts, generator) if noise else None
        return PreparedImage(contexts, made, think_text, think_ids, {"prefill_s": time.perf_counter() - t0})

    def initial_noise(self, req: GenerationRequest, contexts: ImageContexts,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """The request's initial noise (`init_noise` when it brings its own), from its seed, on
        the CPU. `generator`: the request's own, where its contexts were built in this process
        (it has drawn the edit's VAE posterior sample); None: contexts built on another stage,
        so a fresh generator draws the posterior sample's values first (discarded), and the
        noise is the same as if made there."""
        if req.init_noise is not None:
            return req.init_noise
        if generator is None:
            generator = _seeded(req.seed)
            # build_contexts' VAE blocks drew a posterior sample per input image, in order: an
            # edit's one image left behind by `for_render` (at the output's size), or the images
            # the request still carries (a chat's earlier images with the edited one)
            shapes = ([(contexts.height, contexts.width)] if req.image_in_contexts
                      else [(im.height, im.width) for im in map(self.vae_resized, req.images)])
            if shapes:
                if self.dit is None:
                    raise RuntimeError("this pipeline has no DiT engine (the noise of contexts made elsewhere is the DiT's)")
                vae = self.dit.vae
                dtype = next(vae.parameters()).dtype
                for height, width in shapes:
                    vae.posterior_draw(vae.posterior_shape(height, width), dtype, generator)
        step = self.cfg.latent_downsample
        return torch.randn((contexts.height // step) * (contexts.width // step), self.cfg.patch_latent_dim,
                           generator=generator, dtype=torch.float32)

    # -- DiT side -----------------------------------------------------------------------

    def render(self, req: GenerationRequest, prepared: PreparedImage,
               on_step: Callable[[StepRecord], None] | None = None) -> GenerationResult:
        if self.dit is None:
            raise RuntimeError("this pipeline has no DiT engine")
        t0 = time.perf_counter()
        tokens = self.dit.denoise(prepared.contexts, req.sampler(), prepared.noise, on_step)
        return self.finish_image(req, prepared, tokens, {"denoise_s": time.perf_counter() - t0})

    def finish_image(self, req: GenerationRequest, prepared: PreparedImage, tokens: torch.Tensor,
                     timings: dict[str, float]) -> GenerationResult:
        """VAE decode of the final latent tokens and the request's result: the end of `render`,
        also for latents denoised in a batch with other requests (`DiT.step`)."""
        if self.dit is None:
            raise RuntimeError("this pipeline has no DiT engine")
        ctx = prepared.contexts
        t0 = time.perf_counter()
        _, image = self.dit.decode_image(tokens, ctx.height, ctx.width)
        timings = dict(prepared.timings, **timings, vae_decode_s=time.perf_counter() - t0)
        return GenerationResult(req.modality, req.prompt, req.seed, think_text=prepared.think_text,
                                think_token_ids=prepared.think_token_ids, image=image, latent_tokens=tokens, timings=timings,
                                prompt_tokens=ctx.gen.length)

    def preview(self, prepared: PreparedImage, record: StepRecord) -> Image.Image:
        """The image the current x0 estimate decodes to: with x_t = (1-t)·x0 + t·eps and the
        model's v = eps - x0, x0 = x_t - t·v (spec 6.3), from the step's guided velocity."""
        if self.dit is None:
            raise RuntimeError("this pipeline has no DiT engine")
        x0 = record.x.float() - record.t * record.guided.float()
        return self.dit.decode_image(x0, prepared.contexts.height, prepared.contexts.width)[1]

    # -- both ---------------------------------------------------------------------------

    def run(self, req: GenerationRequest, on_step: Callable[[StepRecord], None] | None = None) -> GenerationResult:
        if req.outputs_image:
            return self.render(req, self.prepare_image(req), on_step)
        return self.understand(req)
