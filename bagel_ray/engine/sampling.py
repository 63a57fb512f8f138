"""Next-token choice from logits: greedy, or sampled with temperature and top-p.

Sampling draws with exponential noise and an argmax (equivalent to a multinomial draw from
the softmax) so it never waits on the device. The official code has no top-p; top_p = 1.0
(the default) leaves the distribution as the official `multinomial(softmax(logits / T))`.
"""

from __future__ import annotations

import torch


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail of each row outside the smallest set whose mass reaches top_p."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


def sample(logits: torch.Tensor, temperature: float, top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of logits [B, V]."""
    if temperature <= 0:
        return greedy(logits)
    probs = top_p_filter(torch.softmax(logits.float() / temperature, dim=-1), top_p)
    noise = torch.empty(probs.shape, dtype=torch.float32, device="cpu").exponential_(generator=generator).to(probs.device)
    return (probs / noise).argmax(dim=-1)
