"""Generation heads (spec 5.3-5.5): timestep embedder, vae2llm/llm2vae, and the frozen 2-D
sin-cos tables. The tables are read from the checkpoint, never recomputed (spec 2.1)."""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionTable(nn.Module):
    """A frozen [G*G, D] table indexed by flattened grid ids r*G + c (`*.pos_embed`)."""

    def __init__(self, grid: int, dim: int) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(grid * grid, dim), requires_grad=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[position_ids]


def timestep_frequencies(dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] (not x1000) -> [cos, sin] features (cos first) -> Linear, SiLU, Linear."""

    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float()[:, None] * timestep_frequencies(self.freq_dim).to(t.device)[None]
        emb = torch.cat((torch.cos(args), torch.sin(args)), dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))
