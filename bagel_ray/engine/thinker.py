"""The Thinker engine: context prefill (text, ViT images) and batched text decoding.

Decoding runs on the engine's own `ContinuousDecoder` (`decoder.py`), set up once when the
engine is made (its cache, and on a GPU the graph of a batch-1 step) and reused by every
call: several prompts decode together in its first slots. A call that needs more slots or
rows than it has sets up a bigger one, kept for the calls after it.
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

DECODE_ROWS = 256  # a decoder's rows grow in steps of this many


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
        """`decode_width`: the rows of each slot of the decoder set up now (a context and its
        new tokens; the default fits a prompt of 1.5k tokens and the default 512 new ones),
        with the step of one slot captured on a GPU, so that no decode pays for its setup
        unless it needs more (0: set up by the first decode)."""
        self.model = model
        self.tokenizer = tokenizer
        self.builder = ContextBuilder(model, tokenizer, vae, cuda_graphs)
        self._decoder: ContinuousDecoder | None = None
        if decode_width > 0:
            self.decoder_for(1, decode_width).prepare(1)

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
        """The engine's decoder when it has `batch` slots of `width` rows and is free; otherwise
        a bigger one is set up and kept (grown, never shrunk), or, while the engine's decoder is
        busy (a decode still being consumed), one for this call alone."""
        current = self._decoder
        if current is not None and current.busy:
            log.debug("the Thinker's decoder is busy: this decode sets up its own")
            return ContinuousDecoder(self, batch, width, sizes=())
        if current is None or batch > current.slots or width > current.width:
            slots = batch if current is None else max(batch, current.slots)
            width = -(-width // DECODE_ROWS) * DECODE_ROWS
            width = width if current is None else max(width, current.width)
            log.info("Thinker decoder: %d slot(s) x %d rows", slots, width)
            self._decoder = current = None  # its memory goes before the new one is made
            self._decoder = ContinuousDecoder(self, slots, width, sizes=())
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
