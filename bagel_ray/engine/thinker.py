"""The Thinker engine: context prefill (text, ViT images) and batched text decoding.

Decoding follows the official `generate_text` (spec 7.2): the first query is `<|im_start|>`
at the context's next position, each step forwards one token per sequence in und mode,
and a sequence stops when it *predicts* `<|im_end|>` (that token is not kept). Several
prompts decode together: their contexts are copied once into a preallocated cache padded to
the longest, and each step writes one row per sequence in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from PIL import Image

from bagel_ray.engine.cancel import Cancelled
from bagel_ray.engine.context import ContextBuilder
from bagel_ray.engine.cuda_graph import capture
from bagel_ray.engine.kv_context import KVContext
from bagel_ray.engine.sampling import greedy, sample
from bagel_ray.model.bagel import BagelModel
from bagel_ray.model.llm import CachedKV, ForwardMode
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
    logits: torch.Tensor | None  # None when the steps were read back in a chunk


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
                 cuda_graphs: bool = True) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.builder = ContextBuilder(model, tokenizer, vae, cuda_graphs)

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
        for step in self.decode_steps(contexts, params, generator, keep_logits):
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

    def cached_logits(self, cache: torch.Tensor, lens: torch.Tensor, positions: torch.Tensor,
                      tokens: torch.Tensor) -> torch.Tensor:
        """One decoding forward of `tokens` [B] over a preallocated cache [layers, 2, B, W, kv,
        hd]: each row is written at `lens` and attends to its cache rows and itself. Static
        shapes and no host reads, so it can run inside a CUDA graph."""
        model = self.model
        hidden, _ = model.llm(model.embed_tokens(tokens)[:, None], positions[:, None], None, CachedKV(cache, lens),
                              ForwardMode(gen=False))
        return model.logits(hidden[:, -1])

    def choosable(self, logits: torch.Tensor) -> torch.Tensor:
        """Rows past the tokenizer are padding of the embedding table: never emit them."""
        return logits[:, : self.tokenizer.vocab_len]

    @torch.inference_mode()
    def decode_steps(
        self, contexts: list[KVContext], params: DecodeParams, generator: torch.Generator | None = None,
        keep_logits: bool = False,
    ) -> Iterator[DecodeStep]:
        """The decoding loop, one yield per step (what streaming and `decode` consume).

        The contexts are copied once into a cache [layers, 2, B, W, kv, hd] sized for the
        longest context plus the new tokens. A step runs the forward, picks the next tokens
        and advances the lengths and positions, all on the device, and records the tokens in a
        history buffer that the host reads every few steps (no wait on the device per token).
        On a GPU, greedy steps replay a CUDA graph of the whole step. Sequences that stopped
        keep computing until the chunk ends; what they produce after their stop is dropped."""
        model, tok = self.model, self.tokenizer
        if not contexts or params.max_new_tokens == 0:
            return
        device, B, steps = model.device, len(contexts), params.max_new_tokens
        width = max(c.length for c in contexts) + steps
        ref = contexts[0].kv
        cache = torch.zeros(ref.shape[0], 2, B, width, *ref.shape[3:], dtype=ref.dtype, device=device)
        for b, c in enumerate(contexts):
            cache[:, :, b, : c.length] = c.kv
        lens = torch.tensor([c.length for c in contexts], device=device)
        positions = torch.tensor([c.rope for c in contexts], device=device)
        tokens = torch.full((B,), tok.bos_id, dtype=torch.long, device=device)
        history = torch.zeros(steps, B, dtype=torch.long, device=device)
        counter = torch.zeros(1, dtype=torch.long, device=device)

        def step() -> torch.Tensor:
            logits = self.cached_logits(cache, lens, positions, tokens)
            choosable = self.choosable(logits)
            nxt = sample(choosable, params.temperature, params.top_p, generator) if params.do_sample else greedy(choosable)
            history.index_copy_(0, counter, nxt[None])
            tokens.copy_(nxt)
            lens.add_(1)
            positions.add_(1)
            counter.add_(1)
            return logits

        graphed = self.cuda_graphs and device.type == "cuda" and not params.do_sample and steps > 1
        run = _graphed(step, (cache, lens, positions, tokens, history, counter)) if graphed else step
        chunk = 1 if keep_logits or not graphed else 8
        done = [False] * B
        taken = 0
        while taken < steps:
            n = min(chunk, steps - taken)
            for _ in range(n):
                logits = run()
            rows = history[taken : taken + n].tolist()
            for row in rows:
                emitted: list[int | None] = []
                stopped_now = [False] * B
                for b, t in enumerate(row):
                    if done[b]:
                        emitted.append(None)
                    elif t == tok.eos_id:
                        done[b] = stopped_now[b] = True
                        emitted.append(None)
                    else:
                        emitted.append(t)
                yield DecodeStep(emitted, stopped_now, logits if chunk == 1 else None)
                if all(done):
                    return
            taken += n


def _graphed(step, state: tuple[torch.Tensor, ...]):
    """Capture `step` (which reads and updates only tensors that stay in place) in a CUDA
    graph; returns a function that replays it and gives the step's logits. The warm-up and the
    capture each run the step once; `state` is restored after both, so the first replay is the
    first real step."""
    saved = [t.clone() for t in state[1:]]  # the cache (state[0]) only gains a row the replay rewrites

    def restore() -> None:
        for t, s in zip(state[1:], saved):
            t.copy_(s)

    graph, logits = capture(step, state[0].device, after_warm_up=restore)
    restore()

    def replay() -> torch.Tensor:
        graph.replay()
        return logits

    return replay
