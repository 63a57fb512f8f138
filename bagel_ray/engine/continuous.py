"""Continuous batching of greedy text decoding: sequences join and leave a running batch.

A decode step costs about the same for 1 or 32 sequences (it reads all the weights either
way), so a server should never make a new request wait for a running batch to finish.
`ContinuousDecoder` keeps `slots` sequences in one preallocated cache [layers, 2, slots, W,
kv, hd]; `admit` copies a prefilled context into the lowest free slot, and `run` advances the
slots a few steps at a time, hands back what each sequence produced, and frees the slots of
finished ones. A step runs over the leading slots that hold every live sequence, rounded up to
a power of four (or all slots), not over all of them: at batch 1 the projections run as
GEMVs (`kernels.linear`), faster than the GEMMs of 32 rows, and the eager attention (the CPU
path) reads every row of each slot it runs, masked or not. On a GPU each of these sizes is one
CUDA graph, all captured when the decoder is made, so that a burst of arrivals never waits for
a capture.

Greedy only: sampled requests decode on their own (`Thinker.decode`), so that a seed gives
the same text whatever else is running. The tokens are those of `Thinker.decode` for the
same context (the same forward and argmax; only the batch composition differs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from bagel_ray.engine.kv_context import KVContext
from bagel_ray.engine.sampling import greedy
from bagel_ray.engine.thinker import Thinker, _graphed


@dataclass
class Sequence:
    """One admitted request: what it has produced so far and whether it is finished."""

    key: object
    max_new_tokens: int
    token_ids: list[int] = field(default_factory=list)
    stopped_on_eos: bool = False
    done: bool = False


class ContinuousDecoder:
    def __init__(self, thinker: Thinker, slots: int, width: int, chunk: int = 8) -> None:
        self.thinker = thinker
        model = thinker.model
        llm = model.cfg.llm
        self.slots, self.width, self.chunk = slots, width, chunk
        dev = model.device
        self.cache = torch.zeros(llm.num_hidden_layers, 2, slots, width, llm.num_key_value_heads, llm.head_dim,
                                 dtype=model.dtype, device=dev)
        self.lens = torch.zeros(slots, dtype=torch.long, device=dev)
        self.positions = torch.zeros(slots, dtype=torch.long, device=dev)
        self.tokens = torch.zeros(slots, dtype=torch.long, device=dev)
        self.history = torch.zeros(chunk, slots, dtype=torch.long, device=dev)
        self.counter = torch.zeros(1, dtype=torch.long, device=dev)
        self.active: list[Sequence | None] = [None] * slots
        sizes = sorted({min(4**i, slots) for i in range(slots.bit_length())})
        with torch.inference_mode():  # every slot idle: a capture's warm-up step writes nothing that is read
            self._steps = {rows: self._step_over(rows) for rows in sizes}  # leading slots run -> its step

    def _step_over(self, rows: int) -> Callable[[], torch.Tensor]:
        """One decoding step of the first `rows` slots, on views of the decoder's state, so that
        steps of every size share one cache and one history (a graph replay on a GPU)."""
        cache, lens, positions = self.cache[:, :, :rows], self.lens[:rows], self.positions[:rows]
        tokens, history, th = self.tokens[:rows], self.history[:, :rows], self.thinker

        def step() -> torch.Tensor:
            logits = th.cached_logits(cache, lens, positions, tokens)
            nxt = greedy(th.choosable(logits))
            history.index_copy_(0, self.counter % self.chunk, nxt[None])
            tokens.copy_(nxt)
            # idle slots stay at length 0 (they rewrite their own first row, which nobody reads)
            busy = lens > 0
            lens.add_(busy.long())
            positions.add_(busy.long())
            self.counter.add_(1)
            return logits

        if th.cuda_graphs and th.model.device.type == "cuda":
            return _graphed(step, (cache, lens, positions, tokens, history, self.counter))
        return step

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
        slot = self.active.index(None)
        self.cache[:, :, slot, : ctx.length] = ctx.kv
        self.lens[slot] = ctx.length
        self.positions[slot] = ctx.rope
        self.tokens[slot] = self.thinker.tokenizer.bos_id
        self.active[slot] = Sequence(key, max_new_tokens)

    @torch.inference_mode()
    def run(self) -> list[Sequence]:
        """Advance the live slots by one chunk of steps; returns the sequences that finished (their
        slots are free again). A context must not be empty: length 0 marks an idle slot."""
        step = self._steps[self._rows()]
        n = min(self.chunk, max(s.max_new_tokens - len(s.token_ids) for s in self.active if s is not None))
        self.counter.zero_()
        for _ in range(n):
            step()
        rows = self.history[:n].tolist()
        finished = []
        eos = self.thinker.tokenizer.eos_id
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
                self.active[slot] = None
                self.lens[slot] = 0
                self.positions[slot] = 0
        return finished

    def cancel(self, key: object) -> None:
        """Drop a sequence (its caller went away); its slot is free from the next chunk on."""
        for slot, seq in enumerate(self.active):
            if seq is not None and seq.key == key:
                self.active[slot] = None
                self.lens[slot] = 0
                self.positions[slot] = 0
