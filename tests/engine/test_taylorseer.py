"""The TaylorSeer state machine of one branch (`engine/taylorseer.py`): which forwards are
full, the factors by hand on a known sequence, the bf16 rounding of the official formulas,
and the memory bound of `MAX_ORDER + 1` factors."""

from __future__ import annotations

import math

import pytest
import torch

from bagel_ray.engine.request import GenerationRequest
from bagel_ray.engine.schedule import cfg_active, make_schedule
from bagel_ray.engine.taylorseer import MAX_ORDER, TaylorState, full_forwards


def run(state: TaylorState, outputs) -> list[tuple[int, bool, torch.Tensor | None]]:
    """Feed `outputs(step)` on full forwards; record (step, full, prediction on Taylor ones)."""
    seen = []
    for _ in range(len(outputs)):
        step, full = state.step, state.next_is_full
        seen.append((step, full, None if full else state.predict()))
        state.advance(outputs[step].clone() if full else None)
    return seen


def test_full_forwards_of_49_steps():
    state = TaylorState()
    full = [n for n in range(49) if state.advance()]
    assert full == [0, 1, 2, 3, 4] + list(range(7, 49, 3))
    assert len(full) == full_forwards(49) == 19
    assert state.activated == [0] + full and state.step == 49


def test_notebook_text2img_counts_19_cond_and_17_cfg_text_full_forwards():
    """50 timesteps, interval (0.4, 1]: cond runs 49 forwards, cfg_text the 41 inside."""
    params = GenerationRequest("text2img", "a fox").sampler()
    schedule = make_schedule(params.num_inference_steps, params.timestep_shift)
    inside = sum(cfg_active(t, params.cfg_interval) for t in schedule.timesteps)
    assert (len(schedule), inside) == (49, 41)
    assert (full_forwards(len(schedule)), full_forwards(inside)) == (19, 17)


def test_factors_and_predictions_by_hand():
    """h(n) = n^2. Forwards 0-3 keep only h (no differences yet); 4: [16, 7]; 5 and 6 predict
    16 + 7x (23, 30); 7 (gap 3): [49, (49-16)/3 = 11, (11-7)/3 = 4/3]; 8 predicts
    49 + 11 + (4/3)/2."""
    h = torch.tensor([float(n * n) for n in range(12)], dtype=torch.float64)[:, None]
    state = TaylorState()
    seen = run(state, h[:9])
    assert [full for _, full, _ in seen] == [True] * 5 + [False, False, True, False]
    assert [p.item() for _, full, p in seen if not full] == [23.0, 30.0, pytest.approx(49 + 11 + 2 / 3)]
    assert [f.item() for f in state.factors] == [49.0, 11.0, pytest.approx(4 / 3)]


def test_a_linear_sequence_is_predicted_exactly():
    h = torch.stack([torch.full((3, 4), 2.0 - 0.25 * n, dtype=torch.float64) for n in range(30)])
    for step, full, pred in run(TaylorState(), h):
        if not full:
            torch.testing.assert_close(pred, h[step], rtol=0, atol=1e-12)


def test_official_rounding_in_bf16_and_at_most_seven_factors():
    """The in-place update and the prediction round as the official out-of-place formulas
    (`new[i+1] = (new[i] - old[i]) / d`, `out += (1 / i!) * f_i * x**i`) bit for bit in bf16,
    the state never holds more than MAX_ORDER + 1 tensors, and the full one's output reuses
    the dropped factor's storage."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(40, 8, 16, generator=g).cumsum(0).bfloat16()
    state = TaylorState()
    ref: list[torch.Tensor] = []
    activated = [0]
    for n in range(40):
        full = state.next_is_full
        if full:
            activated.append(n)
            new = [h[n]]
            for i in range(MAX_ORDER):
                if i < len(ref) and n > 3:
                    new.append((new[i] - ref[i]) / (activated[-1] - activated[-2]))
                else:
                    break
            ref = new
            spare = state.spare()
            kept = {f.data_ptr() for f in state.factors}
            out = h[n].clone() if spare is None else spare.copy_(h[n])
            state.advance(out)
            assert len(state.factors) == len(ref) <= MAX_ORDER + 1
            assert spare is None or state.factors[0].data_ptr() in kept
            for got, want in zip(state.factors, ref):
                assert torch.equal(got, want)
        else:
            x = n - activated[-1]
            want = 0
            for i, f in enumerate(ref):
                want = want + (1 / math.factorial(i)) * f * (x**i)
            assert torch.equal(state.predict(), want)
            state.advance()
    assert len(state.factors) == MAX_ORDER + 1


def test_a_full_forward_cannot_predict_and_a_taylor_one_has_no_spare():
    state = TaylorState()
    with pytest.raises(RuntimeError, match="full one"):
        state.predict()
    for n in range(5):
        state.advance(torch.full((2,), float(n)))
    with pytest.raises(RuntimeError, match="full forward"):
        state.spare()
