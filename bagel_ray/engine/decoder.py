"""Text decoding: the one decode path of the Thinker, set up once and reused by every caller.

Decoding follows the official `generate_text` (spec 7.2): the first query is `<|im_start|>`
at the context's next position, each step forwards one token per sequence in und mode, and a
sequence stops when it *predicts* `<|im_end|>` (that token is not kept).

`ContinuousDecoder` holds `slots` sequences in one preallocated cache [layers, 2, slots, W,
kv, hd] with their lengths, positions, last tokens and a history of the tokens of the last
chunk of steps. A step runs the forward of the leading slots, picks the next tokens and
advances the live slots, all on the device; the host reads the history once a chunk (no wait
on the device per token). On a GPU the greedy step of each slot count is a CUDA graph,
captured the first time that count runs (or when the decoder is made) and replayed after.
Two ways to drive it:

- `steps`: a batch of contexts decoded together, one yield per step (`Thinker.decode`, the
  CLI, the pipeline, bulk jobs, streaming). The step runs exactly the batch's slots, so a
  request's tokens do not depend on how many slots the decoder has, and a sampled step draws
  the noise of those rows alone. Sampled steps run eagerly: the draw is made on the host from
  the request's seeded generator.
- `admit` / `run`: continuous batching (the Thinker deployment): sequences join the lowest
  free slot between chunks and leave when they end. A decode step costs about the same for 1
  or 32 sequences (it reads all the weights either way), so a new request never waits for a
  running batch to finish. A step runs over the leading slots that hold every live sequence,
  rounded up to a power of four (or all slots): at batch 1 the projections run as GEMVs
  (`kernels.gemv.linear`), faster than the GEMMs of 32 rows, and the eager attention (the CPU
  path) reads every row of each slot it runs. Each of these sizes is captured when the
  decoder is made, so that a burst of arrivals never waits for a capture. Greedy only: a
  sampled request decodes through `steps`, so that a seed gives the same text whatever else
  is running. The tokens are those of `steps` for the same context (the same forward and
  argmax; only the batch composition differs).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from bagel_ray.engine.cuda_graph import capture
from bagel_ray.engine.kv_context import KVContext
from bagel_ray.engine.params import DecodeParams
from bagel_ray.engine.sampling import greedy, sample
from bagel_ray.model.bagel import BagelModel
from bagel_ray.model.llm import CachedKV, ForwardMode
from bagel_ray.model.tokenizer import BagelTokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeStep:
    """One decoding step: the token each sequence emitted (None once finished or on the stop
    token), which sequences predicted `<|im_end|>` at this step, and the step's logits."""

    tokens: list[int | None]
    stopped: list[bool]
    logits: torch.Tensor | None  # None when the steps were read back in a chunk


@dataclass
class Sequence:
    """One admitted request: what it has produced so far and whether it is finished."""

    key: object
    max_new_tokens: int
    token_ids: list[int] = field(default_factory=list)
    stopped_on_eos: bool = False
    done: bool = False


class DecodingEngine(Protocol):
    """What the decoder uses of its engine (the Thinker)."""

    model: BagelModel
    tokenizer: BagelTokenizer
    cuda_graphs: bool


def cached_logits(model: BagelModel, cache: torch.Tensor, lens: torch.Tensor, positions: torch.Tensor,
                  tokens: torch.Tensor) -> torch.Tensor:
    """One decoding forward of `tokens` [B] over a preallocated cache [layers, 2, B, W, kv,
    hd]: each row is written at `lens` and attends to its cache rows and itself. Static
    shapes and no host reads, so it can run inside a CUDA graph."""
    hidden, _ = model.llm(model.embed_tokens(tokens)[:, None], positions[:, None], None, CachedKV(cache, lens),
                          ForwardMode(gen=False))
    return model.logits(hidden[:, -1])


def choosable(logits: torch.Tensor, tokenizer: BagelTokenizer) -> torch.Tensor:
    """Rows past the tokenizer are padding of the embedding table: never emit them."""
    return logits[:, : tokenizer.vocab_len]


def _graphed(step: Callable[[], torch.Tensor], state: tuple[torch.Tensor, ...]) -> Callable[[], torch.Tensor]:
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


class ContinuousDecoder:
    def __init__(self, engine: DecodingEngine, slots: int, width: int, chunk: int = 8,
                 sizes: tuple[int, ...] | None = None) -> None:
        """`slots` sequences of up to `width` cache rows each; the host reads the tokens every
        `chunk` steps. `sizes`: the slot counts whose greedy steps are prepared (captured on a
        GPU) now, and that continuous batching runs; by default the powers of four below
        `slots`, and `slots`."""
        self.engine = engine
        model = engine.model
        llm = model.cfg.llm
        self.slots, self.width, self.chunk = slots, width, chunk
        dev = model.device
        self.cache = torch.zeros(llm.num_hidden_layers, 2, slots, width, llm.num_key_value_heads, llm.head_dim,
                                 dtype=model.dtype, device=dev)
        self.lens = torch.zeros(slots, dtype=torch.long, device=dev)
        self.positions = torch.zeros(slots, dtype=torch.long, device=dev)
        self.tokens = torch.zeros(slots, dtype=torch.long, device=dev)
        self.live = torch.zeros(slots, dtype=torch.long, device=dev)  # 1: the slot's length and position advance
        self.history = torch.zeros(chunk, slots, dtype=torch.long, device=dev)
        self.counter = torch.zeros(1, dtype=torch.long, device=dev)
        self.active: list[Sequence | None] = [None] * slots
        self.sizes = tuple(sorted({min(4**i, slots) for i in range(slots.bit_length())} if sizes is None else sizes))
        self._dispatch: dict[int, Callable[[], torch.Tensor]] = {}  # slot count -> its greedy step
        self._graphs: dict[int, Callable[[], torch.Tensor]] = {}  # slot count -> the replay of its captured step
        self._in_use = threading.Lock()  # held while `steps` decodes a batch
        with torch.inference_mode():  # every slot idle: a capture's warm-up step writes nothing that is read
            self._steps = {rows: self._greedy(rows) for rows in self.sizes}  # what `run` chooses from

    # -- the step -------------------------------------------------------------------------

    def _state(self, rows: int, width: int | None = None) -> tuple[torch.Tensor, ...]:
        """Views of the decoder's state for the first `rows` slots (and the first `width` rows of
        each, default all): steps of every size share one cache and one history."""
        return (self.cache[:, :, :rows, :width], self.lens[:rows], self.positions[:rows], self.tokens[:rows],
                self.history[:, :rows], self.counter, self.live[:rows])

    def _step_over(self, rows: int, choose: Callable[[torch.Tensor], torch.Tensor],
                   width: int | None = None) -> Callable[[], torch.Tensor]:
        """One decoding step of the first `rows` slots (over their first `width` cache rows),
        choosing the next tokens with `choose`."""
        cache, lens, positions, tokens, history, counter, live = self._state(rows, width)
        engine = self.engine

        def step() -> torch.Tensor:
            logits = cached_logits(engine.model, cache, lens, positions, tokens)
            nxt = choose(choosable(logits, engine.tokenizer))
            history.index_copy_(0, counter % self.chunk, nxt[None])
            tokens.copy_(nxt)
            # idle slots stay at length 0 (they rewrite their own first row, which nobody reads)
            lens.add_(live)
            positions.add_(live)
            counter.add_(1)
            return logits

        return step

    def _graphs_on(self) -> bool:
        return self.engine.cuda_graphs and self.engine.model.device.type == "cuda"

    def _greedy(self, rows: int) -> Callable[[], torch.Tensor]:
        """The greedy step of the first `rows` slots, made once: a replay of its CUDA graph when
        graphs are on (captured here, or on its first call if they were off then), else the
        eager step. The engine's `cuda_graphs` is read at each call."""
        if rows in self._dispatch:
            return self._dispatch[rows]
        eager = self._step_over(rows, greedy)

        def step() -> torch.Tensor:
            if not self._graphs_on():
                return eager()
            if rows not in self._graphs:  # the state as it is now is restored before the first replay
                self._capture(rows, eager)
            return self._graphs[rows]()

        if self._graphs_on():  # capture now, not in the middle of a request
            with torch.inference_mode():
                self._capture(rows, eager)
        self._dispatch[rows] = step
        return step

    def prepare(self, rows: int) -> None:
        """Set up the greedy step of `rows` slots now (its capture, on a GPU with graphs on)."""
        self._greedy(rows)

    def _capture(self, rows: int, eager: Callable[[], torch.Tensor]) -> None:
        log.debug("decoder: capturing the greedy step of %d slot(s) x %d rows", rows, self.width)
        self._graphs[rows] = _graphed(eager, self._state(rows))

    # -- batches --------------------------------------------------------------------------

    def fits_batch(self, contexts: list[KVContext], max_new_tokens: int) -> bool:
        """Whether `steps` can decode these contexts: a slot each, and each context with its
        new tokens inside a slot's rows."""
        return len(contexts) <= self.slots and max(c.length for c in contexts) + max_new_tokens <= self.width

    @property
    def busy(self) -> bool:
        """Whether a batch is decoding (`steps`) or continuous sequences hold slots."""
        return self._in_use.locked() or any(s is not None for s in self.active)

    @torch.inference_mode()
    def steps(self, contexts: list[KVContext], params: DecodeParams, generator: torch.Generator | None = None,
              keep_logits: bool = False) -> Iterator[DecodeStep]:
        """Decode one continuation per context, all together, one yield per step.

        The contexts are copied into the first slots; the step runs those slots only. Greedy
        steps on a GPU replay the graph of that slot count and are read back `chunk` at a time
        (one at a time with `keep_logits`); sampled steps, and every step on the CPU, run
        eagerly, one at a time. Sequences
        that stopped keep computing until the chunk ends; what they produce after their stop
        is dropped. The decoder must not be busy (`busy`), and the batch must fit (`fits_batch`)."""
        if not contexts or params.max_new_tokens == 0:
            return
        if not self.fits_batch(contexts, params.max_new_tokens):
            raise ValueError(f"{len(contexts)} contexts of up to {max(c.length for c in contexts)} rows + "
                             f"{params.max_new_tokens} new tokens do not fit {self.slots} slots of {self.width} rows")
        if any(s is not None for s in self.active) or not self._in_use.acquire(blocking=False):
            raise RuntimeError("the decoder is busy with another decode")
        try:
            yield from self._batch(contexts, params, generator, keep_logits)
        finally:  # every slot idle again, at length 0
            for t in (self.live, self.lens, self.positions):
                t.zero_()
            self._in_use.release()

    def _batch(self, contexts: list[KVContext], params: DecodeParams, generator: torch.Generator | None,
               keep_logits: bool) -> Iterator[DecodeStep]:
        tok = self.engine.tokenizer
        B, steps = len(contexts), params.max_new_tokens
        for b, c in enumerate(contexts):
            self.cache[:, :, b, : c.length] = c.kv
        self.lens[:B] = torch.tensor([c.length for c in contexts])
        self.positions[:B] = torch.tensor([c.rope for c in contexts])
        self.tokens[:B] = tok.bos_id
        self.live[:B] = 1
        # On a GPU the decode kernel reads only the rows a sequence has: the step runs over every
        # row of the slots (a graph's shapes). The CPU's eager attention reads every row it is
        # given: there the step runs over the rows this batch needs.
        cut = None if self.engine.model.device.type == "cuda" else max(c.length for c in contexts) + steps
        if params.do_sample:
            run = self._step_over(B, lambda logits: sample(logits, params.temperature, params.top_p, generator), cut)
        elif cut is None:
            run = self._greedy(B)
        else:
            run = self._step_over(B, greedy, cut)
        chunk = self.chunk if run is self._dispatch.get(B) and self._graphs_on() and not keep_logits else 1
        done = [False] * B
        taken = 0
        while taken < steps:
            n = min(chunk, steps - taken)
            self.counter.zero_()
            for _ in range(n):
                logits = run()
            for row in self.history[:n, :B].tolist():
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

    # -- continuous batching ----------------------------------------------------------------

    def _rows(self) -> int:
        """The fewest leading slots of a prepared step that include the last live slot."""
        last = max(i for i, seq in enumerate(self.active) if seq is not None)
        return min(rows for rows in self._steps if rows > last)

    @property
    def free_slots(self) -> int:
        return sum(1 for s in self.active if s is None)

    def fits(self, ctx: KVContext, max_new_tokens: int) -> bool:
        """Whether a sequence fits its slot's `width` rows: its context, one row a step, and the
        steps it may run past its end (a chunk runs as many steps as its longest sequence needs,
        up to `chunk`; the others keep writing a row a step until the chunk ends)."""
        return ctx.length + max_new_tokens + self.chunk <= self.width

    @torch.inference_mode()
    def admit(self, key: object, ctx: KVContext, max_new_tokens: int) -> None:
        """Put a prefilled context into the lowest free slot (live sequences stay packed at the
        front, so steps run few slots); its first query is `<|im_start|>`."""
        if not self.fits(ctx, max_new_tokens):
            raise ValueError(f"context of {ctx.length} + {max_new_tokens} new tokens does not fit {self.width} rows")
        if self._in_use.locked():
            raise RuntimeError("the decoder is busy with a batch")
        slot = self.active.index(None)
        self.cache[:, :, slot, : ctx.length] = ctx.kv
        self.lens[slot] = ctx.length
        self.positions[slot] = ctx.rope
        self.tokens[slot] = self.engine.tokenizer.bos_id
        self.live[slot] = 1
        self.active[slot] = Sequence(key, max_new_tokens)

    @torch.inference_mode()
    def run(self) -> list[Sequence]:
        """Advance the live slots by one chunk of steps; returns the sequences that finished (their
        slots are free again)."""
        step = self._steps[self._rows()]
        n = min(self.chunk, max(s.max_new_tokens - len(s.token_ids) for s in self.active if s is not None))
        self.counter.zero_()
        for _ in range(n):
            step()
        rows = self.history[:n].tolist()
        finished = []
        eos = self.engine.tokenizer.eos_id
        for slot, seq in enumerate(self.active):
            if seq is None:
                continue
            for row in rows:
                if seq.done:
                    break
                token = row[slot]
                if token == eos:
                    seq.stopped_on_eos = seq.done = True
                else:
                    seq.token_ids.append(token)
                    seq.done = len(seq.token_ids) >= seq.max_new_tokens
            if seq.done:
                finished.append(seq)
                self._free(slot)
        return finished

    def cancel(self, key: object) -> None:
        """Drop a sequence (its caller went away); its slot is free from the next chunk on."""
        for slot, seq in enumerate(self.active):
            if seq is not None and seq.key == key:
                self._free(slot)

    def _free(self, slot: int) -> None:
        self.active[slot] = None
        self.live[slot] = 0
        self.lens[slot] = 0
        self.positions[slot] = 0
