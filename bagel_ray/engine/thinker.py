"""The Thinker engine: context prefill (text, ViT images) and batched text decoding.

Decoding runs on the engine's own `ContinuousDecoder` (`decoder.py`), set up once when the
engine is made (its cache, and on a GPU the graph of a batch-1 step) and reused by every
call: several prompts decode together in its first slots. A batch of more prompts than it has
slots sets up one with more (kept for the calls after it); a decode that needs more rows than
a slot has gets a decoder of its own for that call, so that one long request does not hold
its memory for good.
"""

from __future__ import annotations

import logging
from contextlib import closing
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from PIL import Image

from bagel_ray.engine.cancel import Cancelled
from bagel_ray.engine.context import ContextBuilder
from bagel_ray.engine.decoder import ContinuousDecoder, DecodeParams, DecodeStep
from bagel_ray.engine.kv_context import KVContext
from bagel_ray.model.bagel import BagelModel
from bagel_ray.model.tokenizer import BagelTokenizer, clean_generated_text
from bagel_ray.model.vae import AutoEncoder

log = logging.getLogger(__name__)


@dataclass
class DecodeOutput:
    token_ids: list[int]
    text: str
    stopped_on_eos: bool
    logits: torch.Tensor | None = field(default=None, repr=False)  # [n, vocab], kept on request


class Thinker:
    """Understanding side of BAGEL. Needs the `und`, `lm_head` and `vit` parts; with `gen`,
    `gen_heads` and a VAE it can also prefill VAE blocks (edits on the Thinker)."""

    def __init__(self, model: BagelModel, tokenizer: BagelTokenizer, vae: AutoEncoder | None = None,
                 cuda_graphs: bool = True, decode_width: int = 2048) -> None:
        """`decode_width`: the rows of each slot of the engine's decoder (a context and its new
        tokens; the default fits a prompt of 1.5k tokens and the default 512 new ones). It is
        set up now, with the step of one slot captured on a GPU, so that no decode that fits
        pays for a setup."""
        if decode_width < 1:
            raise ValueError(f"decode_width must be >= 1, got {decode_width}")
        self.model = model
        self.tokenizer = tokenizer
        self.builder = ContextBuilder(model, tokenizer, vae, cuda_graphs)
        self.decode_width = decode_width
        self._decoder: ContinuousDecoder | None = None
        self.decoder_for(1, 1).prepare(1)

    @property
    def cuda_graphs(self) -> bool:
        """Whether greedy decoding and prompt prefills replay CUDA graphs (on a GPU)."""
        return self.builder.cuda_graphs

    @cuda_graphs.setter
    def cuda_graphs(self, on: bool) -> None:
        self.builder.cuda_graphs = on

    def empty(self) -> KVContext:
        return self.builder.empty()

    def append_text(self, ctx: KVContext, text: str) -> KVContext:
        return self.builder.append_text(ctx, text)

    def append_tokens(self, ctx: KVContext, segment: list[int]) -> KVContext:
        return self.builder.append_tokens(ctx, segment)

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
        should_stop: Callable[[], bool] | None = None,
    ) -> list[DecodeOutput]:
        """Decode one continuation per context, all in one batch. `should_stop` is asked
        after each step (on the host); when it says yes, `Cancelled` is raised."""
        tok = self.tokenizer
        generated: list[list[int]] = [[] for _ in contexts]
        logits_kept: list[list[torch.Tensor]] = [[] for _ in contexts]
        stopped = [False] * len(contexts)
        with closing(self.decode_steps(contexts, params, generator, keep_logits)) as steps:
            for step in steps:
                if should_stop is not None and should_stop():
                    raise Cancelled("decoding stopped: the request was cancelled")
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

    def decoder_for(self, batch: int, width: int) -> ContinuousDecoder:
        """A decoder for `batch` sequences of up to `width` rows: the engine's (given more slots
        when the batch needs them: kept), or one for this call alone when `width` passes
        `decode_width` or the engine's is busy (a decode still being consumed)."""
        current = self._decoder
        if width > self.decode_width or (current is not None and current.busy):
            log.debug("Thinker: a decoder of %d slot(s) x %d rows for this call alone (%s)", batch, width,
                      "the engine's is busy" if width <= self.decode_width else f"past {self.decode_width} rows")
            return ContinuousDecoder(self, batch, width, sizes=())
        if current is None or batch > current.slots:
            slots = max(batch, current.slots if current is not None else 1)
            log.info("Thinker decoder: %d slot(s) x %d rows", slots, self.decode_width)
            self._decoder = current = None  # its memory goes before the new one is made
            self._decoder = ContinuousDecoder(self, slots, self.decode_width, sizes=())
        return self._decoder

    def decode_steps(
        self, contexts: list[KVContext], params: DecodeParams, generator: torch.Generator | None = None,
        keep_logits: bool = False,
    ) -> Iterator[DecodeStep]:
        """The decoding loop, one yield per step (what streaming and `decode` consume); see
        `ContinuousDecoder.steps`."""
        if not contexts or params.max_new_tokens == 0:
            return
        decoder = self.decoder_for(len(contexts), max(c.length for c in contexts) + params.max_new_tokens)
        yield from decoder.steps(contexts, params, generator, keep_logits)
