"""The flow-matching schedule and Euler step of the official sampler (spec 6.3).

`x_t = (1 - t) x_0 + t eps`, the model predicts `v = eps - x_0`, t = 1 is noise. With N =
`num_timesteps` the grid is linspace(1, 0, N) in fp32, shifted by s; the model runs at the
first N - 1 points (the last, 0, is never evaluated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """tau' = s tau / (1 + (s - 1) tau)."""
    return shift * t / (1 + (shift - 1) * t)


@dataclass(frozen=True)
class Schedule:
    timesteps: torch.Tensor  # [N-1] fp32, the points the model is evaluated at
    dts: torch.Tensor  # [N-1] fp32, tau'_i - tau'_{i+1}

    def __len__(self) -> int:
        return self.timesteps.shape[0]


def make_schedule(num_timesteps: int, shift: float) -> Schedule:
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1 (N steps run N-1 model evaluations), got {num_timesteps}")
    if not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"timestep_shift must be a finite number > 0, got {shift}")
    grid = shift_time(torch.linspace(1, 0, num_timesteps), shift)
    return Schedule(timesteps=grid[:-1], dts=grid[:-1] - grid[1:])


def cfg_active(t: torch.Tensor, interval: tuple[float, float]) -> bool:
    """CFG applies when lo < t <= hi, on the shifted t compared as fp32 (spec 11.11)."""
    return bool((t > interval[0]) & (t <= interval[1]))


def euler_step(x: torch.Tensor, v: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """x <- x - v dt. dt is a 0-dim fp32 tensor, so v*dt keeps v's dtype (bf16 rounding for a
    bf16 velocity, as the reference) and the subtraction runs in x's fp32."""
    return x - v.to(x.device) * dt
