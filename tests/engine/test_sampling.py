"""Next-token choice: greedy, seeded sampling with temperature and top-p."""

from __future__ import annotations

import pytest
import torch

from bagel_ray.engine.sampling import greedy, sample, top_p_filter

PROBS = torch.tensor([0.5, 0.3, 0.2])
LOGITS = PROBS.log()
DRAWS = 6000


def frequencies(tokens: torch.Tensor, n: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=n).double() / tokens.numel()


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    observed = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    return float(((observed - expected) ** 2 / expected).sum())


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [5.0, 0.0, 0.0, 4.9], [-3.0, -2.0, -1.0, -4.0]])
    assert greedy(logits).tolist() == [1, 0, 2]
    assert torch.equal(greedy(logits), logits.argmax(dim=-1))
    assert greedy(logits.to(torch.bfloat16)).tolist() == [1, 0, 2]


def test_sample_reproducible_with_seed():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    a = sample(logits, 1.0, generator=torch.Generator().manual_seed(7))
    b = sample(logits, 1.0, generator=torch.Generator().manual_seed(7))
    c = sample(logits, 1.0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sample_follows_distribution():
    """6000 draws from [0.5, 0.3, 0.2] (one row each): chi-square with 2 degrees of freedom
    stays under 13.8 (p = 0.001), deterministically through the seed."""
    tokens = sample(LOGITS.expand(DRAWS, 3), 1.0, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (DRAWS,)
    assert chi_square(tokens, PROBS) < 13.8
    torch.testing.assert_close(frequencies(tokens, 3), PROBS.double(), rtol=0, atol=0.03)


def test_temperature_sharpens():
    """T = 0.5 samples from softmax(logits / 0.5) = p^2 / sum p^2 = [25, 9, 4] / 38."""
    tokens = sample(LOGITS.expand(DRAWS, 3), 0.5, generator=torch.Generator().manual_seed(1))
    expected = torch.tensor([25.0, 9.0, 4.0]) / 38
    assert chi_square(tokens, expected) < 13.8
    torch.testing.assert_close(frequencies(tokens, 3), expected.double(), rtol=0, atol=0.03)


def test_top_p_filter_keeps_smallest_nucleus():
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.6, 0.3]])

    def kept(top_p: float) -> list[list[bool]]:
        out = top_p_filter(probs, top_p)
        assert torch.equal(out[out > 0], probs[out > 0])  # kept entries are unchanged
        return (out > 0).tolist()

    # 0.5 alone reaches 0.5; 0.6 alone too.
    assert kept(0.5) == [[False, True, False], [False, True, False]]
    # 0.5 + 0.3 = 0.8 >= 0.7; 0.6 + 0.3 = 0.9 >= 0.7.
    assert kept(0.7) == [[False, True, True], [False, True, True]]
    # 0.85: the first row needs all three, the second still two.
    assert kept(0.85) == [[True, True, True], [False, True, True]]
    assert torch.equal(top_p_filter(probs, 1.0), probs)


def test_sample_top_p_never_draws_outside_nucleus():
    tokens = sample(LOGITS.expand(DRAWS, 3), 1.0, top_p=0.7, generator=torch.Generator().manual_seed(2))
    counts = torch.bincount(tokens, minlength=3)
    assert counts[2] == 0
    # The kept mass is renormalised: 0.5 / 0.8 and 0.3 / 0.8.
    expected = torch.tensor([0.625, 0.375, 0.0], dtype=torch.float64)
    torch.testing.assert_close(frequencies(tokens, 3), expected, rtol=0, atol=0.03)
    assert chi_square(tokens, torch.tensor([0.625, 0.375])) < 10.8  # 1 degree of freedom, p = 0.001


def test_tiny_top_p_is_greedy():
    logits = torch.randn(16, 100, generator=torch.Generator().manual_seed(3))
    tokens = sample(logits, 1.0, top_p=1e-6, generator=torch.Generator().manual_seed(4))
    assert torch.equal(tokens, logits.argmax(dim=-1))


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_non_positive_temperature_is_greedy(temperature):
    logits = torch.randn(16, 100, generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(6)
    state = gen.get_state()
    assert torch.equal(sample(logits, temperature, generator=gen), logits.argmax(dim=-1))
    assert torch.equal(gen.get_state(), state)  # no random draw consumed


def test_sample_does_not_touch_global_rng():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    sample(LOGITS.expand(4, 3), 1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), before)


def test_sample_dtype_and_shape():
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    tokens = sample(logits, 0.7, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (3,) and tokens.dtype == torch.long
    assert bool(((tokens >= 0) & (tokens < 10)).all())
