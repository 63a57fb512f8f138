"""Continuous batching of greedy text decoding: sequences join and leave a running batch.

A decode step costs about the same for 1 or 32 sequences (it reads all the weights either
way), so a server should never make a new request wait for a running batch to finish.
`ContinuousDecoder` keeps `slots` sequences in one preallocated cache [layers, 2, slots, W,
kv, hd]; `admit` copies a prefilled context into a free slot, and `run` advances every slot a
few steps at a time (one CUDA graph replay a step on a GPU, captured once for the decoder's
life), hands back what each sequence produced, and frees the slots of finished ones.

Greedy only: sampled requests decode on their own (`Thinker.decode`), so that a seed gives
the same text whatever else is running. The tokens are those of `Thinker.decode` for the
same context (the same forward and argmax; only the batch composition differs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
        self.key_index = torch.arange(width, device=dev)
        self.active: list[Sequence | None] = [None] * slots
        self._step = None

    def _forward_step(self) -> torch.Tensor:
        th = self.thinker
        logits = th.cached_logits(self.cache, self.lens, self.positions, self.tokens, self.key_index)
        nxt = greedy(th.choosable(logits))
        self.history.index_copy_(0, self.counter % self.chunk, nxt[None])
        self.tokens.copy_(nxt)
        # idle slots stay at length 0 (they rewrite their own first row, which nobody reads)
        busy = self.lens > 0
        self.lens.add_(busy.long())
        self.positions.add_(busy.long())
        self.counter.add_(1)
        return logits

    @property
    def free_slots(self) -> int:
        return sum(1 for s in self.active if s is None)

    def fits(self, ctx: KVContext, max_new_tokens: int) -> bool:
        return ctx.length + max_new_tokens + 1 <= self.width

    @torch.inference_mode()
    def admit(self, key: object, ctx: KVContext, max_new_tokens: int) -> None:
        """Put a prefilled context into a free slot; its first query is `<|im_start|>`."""
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
        """Advance every slot by one chunk of steps; returns the sequences that finished (their
        slots are free again). A context must not be empty: length 0 marks an idle slot."""
        if self._step is None:
            dev = self.thinker.model.device
            graphed = self.thinker.cuda_graphs and dev.type == "cuda"
            self._step = _graphed(self._forward_step, (self.cache, self.lens, self.positions, self.tokens,
                                                       self.history, self.counter)) if graphed else self._forward_step
        n = min(self.chunk, max(s.max_new_tokens - len(s.token_ids) for s in self.active if s is not None))
        self.counter.zero_()
        for _ in range(n):
            self._step()
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
