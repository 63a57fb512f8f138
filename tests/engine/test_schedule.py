"""The flow-matching schedule and Euler step (spec 6.3, 11.9, 11.11, 11.12)."""

from __future__ import annotations

import pytest
import torch

from bagel_ray.engine.schedule import cfg_active, euler_step, make_schedule, shift_time


def test_official_schedule_values():
    """N = 50, s = 3: 49 model evaluations at 1.0, 0.99310, 0.98601, ..., 0.16364, 0.11321, 0.05882."""
    s = make_schedule(50, 3.0)
    assert len(s) == 49
    assert s.timesteps.shape == s.dts.shape == (49,)
    assert s.timesteps.dtype == s.dts.dtype == torch.float32
    assert s.timesteps[0].item() == 1.0
    torch.testing.assert_close(s.timesteps[:3], torch.tensor([1.0, 0.99310, 0.98601]), rtol=0, atol=5e-6)
    torch.testing.assert_close(s.timesteps[-3:], torch.tensor([0.16364, 0.11321, 0.05882]), rtol=0, atol=5e-6)
    # The last grid point, 0, is never evaluated: the final dt takes the state all the way there.
    assert s.dts[-1].item() == s.timesteps[-1].item()
    assert bool((s.dts > 0).all())


def test_schedule_is_fp32_linspace_then_shift():
    """The reference computes linspace(1, 0, N) in fp32 and shifts it in fp32 (spec 11.12)."""
    grid = torch.linspace(1, 0, 50)
    shifted = 3.0 * grid / (1 + 2.0 * grid)
    s = make_schedule(50, 3.0)
    assert torch.equal(s.timesteps, shifted[:-1])
    assert torch.equal(s.dts, shifted[:-1] - shifted[1:])


@pytest.mark.parametrize("n,shift", [(50, 3.0), (2, 3.0), (10, 1.0), (30, 0.5)])
def test_dts_sum_to_one(n, shift):
    s = make_schedule(n, shift)
    assert s.dts.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_cfg_interval_gating():
    """lo < t <= hi on the shifted t: 41 of 49 steps with [0.4, 1], all 49 with [0, 1] (spec 6.3)."""
    s = make_schedule(50, 3.0)
    assert sum(cfg_active(t, (0.4, 1.0)) for t in s.timesteps) == 41
    assert sum(cfg_active(t, (0.0, 1.0)) for t in s.timesteps) == 49
    # The active steps are the first 41 (t decreases monotonically).
    flags = [cfg_active(t, (0.4, 1.0)) for t in s.timesteps]
    assert flags == [True] * 41 + [False] * 8
    # Bounds: the upper one is inclusive, the lower one exclusive.
    assert cfg_active(torch.tensor(1.0), (0.4, 1.0))
    assert not cfg_active(torch.tensor(0.4), (0.4, 1.0))
    assert not cfg_active(torch.tensor(0.5), (0.0, 0.5 - 1e-3))


def test_shift_one_is_identity():
    s = make_schedule(10, 1.0)
    grid = torch.linspace(1, 0, 10)
    assert torch.equal(s.timesteps, grid[:-1])
    t = torch.rand(100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(shift_time(t, 1.0), t)


def test_single_point_grid_has_no_steps():
    s = make_schedule(1, 3.0)
    assert len(s) == 0
    assert s.timesteps.numel() == 0 and s.dts.numel() == 0


def test_two_points_one_full_step():
    s = make_schedule(2, 3.0)
    assert s.timesteps.tolist() == [1.0]
    assert s.dts.tolist() == [1.0]


@pytest.mark.parametrize("n", [0, -1, -50])
def test_invalid_num_timesteps(n):
    with pytest.raises(ValueError, match="num_timesteps"):
        make_schedule(n, 3.0)


@pytest.mark.parametrize("shift", [0.0, -1.0])
def test_invalid_shift(shift):
    with pytest.raises(ValueError, match="timestep_shift"):
        make_schedule(50, shift)


def test_euler_step_bf16_velocity_rounds_product():
    """bf16 v times a 0-dim fp32 dt stays bf16 (rounded); the subtraction runs in fp32 (spec 11.9)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    v = torch.randn(256, 64, generator=g).to(torch.bfloat16)
    dt = make_schedule(50, 3.0).dts[0]
    assert dt.dim() == 0 and dt.dtype == torch.float32
    out = euler_step(x, v, dt)
    assert out.dtype == torch.float32
    product = (v.float() * dt).to(torch.bfloat16).float()  # bf16 rounding of v*dt
    assert torch.equal(out, x - product)
    # The rounding is visible: the all-fp32 update differs.
    assert not torch.equal(out, x - v.float() * dt)


def test_euler_step_fp32_velocity():
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(16, 64, generator=g), torch.randn(16, 64, generator=g)
    dt = torch.tensor(0.25)
    out = euler_step(x, v, dt)
    assert out.dtype == torch.float32
    assert torch.equal(out, x - v * dt)


def test_euler_loop_reaches_x0_for_exact_velocity():
    """With the exact velocity v = eps - x0 on the path x_t = (1-t) x0 + t eps, the Euler steps
    of any schedule land on x0 (the steps sum to 1)."""
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(8, 64, generator=g, dtype=torch.float64), torch.randn(8, 64, generator=g, dtype=torch.float64)
    s = make_schedule(12, 3.0)
    x = eps.clone()
    for i in range(len(s)):
        x = euler_step(x, eps - x0, s.dts[i].double())
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-6)
