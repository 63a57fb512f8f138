"""TaylorSeer step caching as the official `enable_taylorseer` does it (spec pitfall 20).

Each CFG branch of a request keeps a `TaylorState`. A branch's forward is either *full* (every
layer runs) or *Taylor* (no layer runs: the residual stream after the last layer is predicted
from the Taylor factors kept at the last full forwards). The official code keeps factors for
every layer, but a predicted layer ignores its input, so only the last layer's prediction ever
reaches the output: the state here holds the last layer's factors only, at most
`MAX_ORDER + 1` tensors of the block's latent rows (the marker rows never reach `llm2vae`).

Which forwards are full depends only on how many forwards the branch has run: the first
`FIRST_ENHANCE`, then every `FRESH_THRESHOLD`-th (for 49 forwards: 0-4, 7, 10, ..., 46, that
is 19). The state machine below is the official one, step for step, so a branch that runs
only inside the CFG interval (its count lags the conditional branch's) follows its own count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

FIRST_ENHANCE = 5  # the first forwards of a branch are all full
FRESH_THRESHOLD = 3  # afterwards one full forward in three
MAX_ORDER = 6  # highest derivative kept: up to 7 factors


@dataclass(eq=False)
class TaylorState:
    """One branch's cache: its forward count `step`, the forward indices at which it ran full
    (`activated`, starting as the official `[0]`), the Taylor forwards since the last full one
    (`counter`) and the factors of the last layer's output (`factors[i]` the i-th finite
    difference quotient, [rows, hidden], in the model's dtype)."""

    step: int = 0
    activated: list[int] = field(default_factory=lambda: [0])
    counter: int = 0
    factors: list[torch.Tensor] = field(default_factory=list)

    @property
    def next_is_full(self) -> bool:
        """Whether the branch's next forward runs the network (reads, changes nothing)."""
        return self.step < FIRST_ENHANCE or self.counter == FRESH_THRESHOLD - 1

    def spare(self) -> torch.Tensor | None:
        """Before a full forward: the storage of the highest factor when all `MAX_ORDER + 1`
        are kept, which that forward's update never reads (it differences factors 0 to
        `MAX_ORDER - 1`), so the new output may be written there and the state never holds
        more than `MAX_ORDER + 1` tensors. Idempotent: a retried step gets it again."""
        if not self.next_is_full:
            raise RuntimeError("spare() is for a full forward")
        if len(self.factors) <= MAX_ORDER:
            return None
        return self.factors[MAX_ORDER]

    def keep(self, output: torch.Tensor) -> torch.Tensor:
        """Before a full forward's `advance`: the state's own copy of that forward's `output`
        (which may be a buffer the next forward overwrites), in `spare()`'s storage when there
        is one."""
        spare = self.spare()
        return output.clone() if spare is None else spare.copy_(output)

    def predict(self) -> torch.Tensor:
        """The Taylor forward's output: sum_i factors[i] * x**i / i!, x = forwards since the
        last full one, in the official order of operations (so bf16 rounds as it does there)."""
        if self.next_is_full or not self.factors:
            raise RuntimeError(f"forward {self.step} of this branch is a full one, or it has no factors")
        x = self.step - self.activated[-1]
        out = self.factors[0]
        for i, factor in enumerate(self.factors[1:], start=1):
            out = out + (1 / math.factorial(i)) * factor * (x**i)
        return out

    def advance(self, output: torch.Tensor | None = None) -> bool:
        """Count one forward of the branch, and after a full one refresh the factors from its
        `output` (the last layer's, before the final norm; the state keeps the tensor, whose
        storage may be `spare()`'s). `output` None after a full forward keeps no factors: for a
        branch whose velocity is another branch's in lockstep with it. Returns whether it was full."""
        full = self.next_is_full
        if full:
            self.counter = 0
            self.activated.append(self.step)
            if output is not None:
                self._refresh(output)
        else:
            self.counter += 1
        self.step += 1
        return full

    def _refresh(self, output: torch.Tensor) -> None:
        """new[0] = output; new[i+1] = (new[i] - old[i]) / (activated[-1] - activated[-2]) while
        old[i] exists (i < MAX_ORDER) and the branch is past its first forwards. Each
        difference is written over old[i], which no later term reads: (new - old) / d equals
        (old - new) / -d bit for bit, as IEEE subtraction and division are sign-symmetric."""
        old = self.factors
        new = [output]
        if self.step > FIRST_ENHANCE - 2:
            distance = self.activated[-1] - self.activated[-2]
            for i in range(min(len(old), MAX_ORDER)):
                new.append(old[i].sub_(new[i]).div_(-distance))
        self.factors = new


def full_forwards(forwards: int) -> int:
    """How many of a branch's first `forwards` forwards run the network."""
    state = TaylorState()
    return sum(state.advance() for _ in range(forwards))
