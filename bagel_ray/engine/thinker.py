"""The Thinker engine: context prefill (text, ViT images) and batched text decoding.

Decoding follows the official `generate_text` (spec 7.2): the first query is `<|im_start|>`
at the context's next position, each step forwards one token per sequence in und mode,
and a sequence stops when it *predicts* `<|im_end|>` (that token is not kept). Several
prompts decode together: their contexts are copied once into a preallocated cache padded to
the longest, and each step writes one row per sequence in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
from PIL import Image

from bagel_ray.engine.context import ContextBuilder
from bagel_ray.engine.kv_context import KVContext
from bagel_ray.engine.sampling import greedy, sample
from bagel_ray.model.bagel import BagelModel
from bagel_ray.model.llm import ForwardMode
from bagel_ray.model.tokenizer import BagelTokenizer, clean_generated_text
from bagel_ray.model.vae import AutoEncoder


@dataclass(frozen=True)
class DecodeParams:
    """`max_new_tokens` counts generated tokens (the official `max_length` minus the leading
    `<|im_start|>`). do_sample=False is greedy, the official default; top_p=1.0 is the
    official (unfiltered) sampling."""

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 0.3
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class DecodeStep:
    """One decoding step: the token each sequence emitted (None once finished or on the stop
    token), which sequences predicted `<|im_end|>` at this step, and the step's logits."""

    tokens: list[int | None]
    stopped: list[bool]
    logits: torch.Tensor


@dataclass
class DecodeOutput:
    token_ids: list[int]
    text: str
    stopped_on_eos: bool
    logits: torch.Tensor | None = field(default=None, repr=False)  # [n, vocab], kept on request


class Thinker:
    """Understanding side of BAGEL. Needs the `und`, `lm_head` and `vit` parts; with `gen`,
    `gen_heads` and a VAE it can also prefill VAE blocks (edits on the Thinker)."""

    def __init__(self, model: BagelModel, tokenizer: BagelTokenizer, vae: AutoEncoder | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.builder = ContextBuilder(model, tokenizer, vae)

    def empty(self) -> KVContext:
        return self.builder.empty()

    def append_text(self, ctx: KVContext, text: str) -> KVContext:
        return self.builder.append_text(ctx, text)

    def append_vit(self, ctx: KVContext, image: Image.Image) -> KVContext:
        return self.builder.append_vit(ctx, image)

    def append_vae(self, ctx: KVContext, image: Image.Image, generator: torch.Generator | None = None) -> KVContext:
        return self.builder.append_vae(ctx, image, generator)

    def decode(
        self,
        contexts: list[KVContext],
        params: DecodeParams,
        generator: torch.Generator | None = None,
        keep_logits: bool = False,
    ) -> list[DecodeOutput]:
        """Decode one continuation per context, all in one batch."""
        tok = self.tokenizer
        generated: list[list[int]] = [[] for _ in contexts]
        logits_kept: list[list[torch.Tensor]] = [[] for _ in contexts]
        stopped = [False] * len(contexts)
        for step in self.decode_steps(contexts, params, generator):
            for b, t in enumerate(step.tokens):
                if t is not None:
                    generated[b].append(t)
                    if keep_logits:
                        logits_kept[b].append(step.logits[b].float().cpu())
                elif step.stopped[b]:
                    stopped[b] = True
        outputs = []
        for b in range(len(contexts)):
            text = clean_generated_text(tok.decode([tok.bos_id] + generated[b]))
            kept = torch.stack(logits_kept[b]) if keep_logits and logits_kept[b] else None
            outputs.append(DecodeOutput(generated[b], text, stopped[b], kept))
        return outputs

    @torch.inference_mode()
    def decode_steps(
        self, contexts: list[KVContext], params: DecodeParams, generator: torch.Generator | None = None
    ) -> Iterator[DecodeStep]:
        """The decoding loop, one yield per step (what streaming and `decode` consume)."""
        model, tok = self.model, self.tokenizer
        if not contexts:
            return
        device, B, steps = model.device, len(contexts), params.max_new_tokens
        layers = contexts[0].kv.shape[0]
        width = max(c.length for c in contexts) + steps
        kv_heads, head_dim = contexts[0].kv.shape[3], contexts[0].kv.shape[4]
        cache = torch.zeros(layers, 2, B, width, kv_heads, head_dim, dtype=contexts[0].kv.dtype, device=device)
        for b, c in enumerate(contexts):
            cache[:, :, b, : c.length] = c.kv
        lens = torch.tensor([c.length for c in contexts], device=device)
        positions = torch.tensor([c.rope for c in contexts], device=device)
        tokens = torch.full((B,), tok.bos_id, dtype=torch.long, device=device)
        rows = torch.arange(B, device=device)
        done = [False] * B
        for _ in range(steps):
            # Keys visible to each query: its valid cache rows, then its own new row.
            mask = torch.cat(
                (torch.arange(width, device=device)[None, :] < lens[:, None], torch.ones(B, 1, dtype=torch.bool, device=device)),
                dim=-1,
            )[:, None, :]
            past = [(cache[i, 0], cache[i, 1]) for i in range(layers)]
            hidden, new_kv = model.llm(model.embed_tokens(tokens)[:, None], positions[:, None], None, past, mask, ForwardMode(gen=False))
            for i, (k, v) in enumerate(new_kv):
                cache[i, 0, rows, lens] = k[:, 0]
                cache[i, 1, rows, lens] = v[:, 0]
            logits = model.logits(hidden[:, -1])
            # Rows past the tokenizer are padding of the embedding table: never emit them.
            choosable = logits[:, : tok.vocab_len]
            nxt = sample(choosable, params.temperature, params.top_p, generator) if params.do_sample else greedy(choosable)
            emitted: list[int | None] = []
            stopped_now = [False] * B
            for b, t in enumerate(nxt.tolist()):
                if done[b]:
                    emitted.append(None)
                elif t == tok.eos_id:
                    done[b] = stopped_now[b] = True
                    emitted.append(None)
                else:
                    emitted.append(t)
            yield DecodeStep(emitted, stopped_now, logits)
            if all(done):
                return
            lens = lens + 1
            positions = positions + 1
            tokens = nxt
