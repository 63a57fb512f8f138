"""CFG combination and renormalisation, checked by hand (spec 6.4, 6.5, 11.9, 11.10)."""

from __future__ import annotations

import math

import pytest
import torch

from bagel_ray.engine.cfg import combine

# Two tokens of two channels. u = v_t + 2 (v_c - v_t) = [[3, 4], [0, 2]].
V_C = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
V_T = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
U = torch.tensor([[3.0, 4.0], [0.0, 2.0]])


def test_global_renorm_by_hand():
    """alpha = |v_c| / |u| over the whole tensor: sqrt(26) / sqrt(29)."""
    out = combine(V_C, V_T, None, 2.0, 1.0, "global", 0.0)
    torch.testing.assert_close(out, U * math.sqrt(26 / 29), rtol=1e-6, atol=0)


def test_channel_renorm_by_hand():
    """Per token: token 0 keeps its norm (alpha 1), token 1 halves ([0, 2] -> [0, 1])."""
    out = combine(V_C, V_T, None, 2.0, 1.0, "channel", 0.0)
    torch.testing.assert_close(out, torch.tensor([[3.0, 4.0], [0.0, 1.0]]), rtol=1e-6, atol=0)


def test_text_channel_renorm_by_hand():
    """Without image guidance, text_channel equals channel."""
    out = combine(V_C, V_T, None, 2.0, 1.0, "text_channel", 0.0)
    torch.testing.assert_close(out, torch.tensor([[3.0, 4.0], [0.0, 1.0]]), rtol=1e-6, atol=0)


def test_text_channel_image_guidance_after_renorm():
    """text_channel: renorm u per token first, then v = v_i + s_i (u - v_i), with no renorm after."""
    v_i = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    out = combine(V_C, V_T, v_i, 2.0, 2.0, "text_channel", 0.0)
    renormed_u = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    expected = v_i + 2.0 * (renormed_u - v_i)  # [[5, 7], [0, 2]]: larger than v_c, not shrunk
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(out, torch.tensor([[5.0, 7.0], [0.0, 2.0]]), rtol=1e-6, atol=0)


def test_channel_image_guidance_before_renorm():
    """global/channel: w = v_i + s_i (u - v_i), then alpha = |v_c| / |w| per token (channel)."""
    v_i = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    out = combine(V_C, V_T, v_i, 2.0, 2.0, "channel", 0.0)
    w = torch.tensor([[5.0, 6.0], [0.0, 4.0]])
    expected = torch.stack((w[0] * 5 / math.sqrt(61), w[1] * 1 / 4))
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)


def test_global_image_guidance_before_renorm():
    v_i = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    out = combine(V_C, V_T, v_i, 2.0, 2.0, "global", 0.0)
    w = torch.tensor([[5.0, 6.0], [0.0, 4.0]])  # |w|^2 = 77
    torch.testing.assert_close(out, w * math.sqrt(26 / 77), rtol=1e-6, atol=0)


@pytest.mark.parametrize("renorm", ["global", "channel", "text_channel"])
@pytest.mark.parametrize("text_scale", [1.0, 0.5])
def test_text_scale_at_most_one_returns_v_c(renorm, text_scale):
    """Even with img_scale > 1 the result is v_c: the cfg_img velocity is discarded (spec 6.4)."""
    v_c = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    v_i = torch.zeros_like(v_c)
    out = combine(v_c, torch.ones_like(v_c), v_i, text_scale, 2.0, renorm, 0.0)
    assert out.dtype == v_c.dtype
    assert torch.equal(out, v_c)


@pytest.mark.parametrize("renorm", ["global", "channel", "text_channel"])
def test_renorm_min_one_disables_renorm(renorm):
    """m = 1 clamps alpha to 1: the output is the plain guided velocity."""
    out = combine(V_C, V_T, None, 2.0, 1.0, renorm, 1.0)
    torch.testing.assert_close(out, U, rtol=0, atol=0)


@pytest.mark.parametrize("renorm", ["global", "channel", "text_channel"])
def test_alpha_never_exceeds_one(renorm):
    """A guided velocity shorter than v_c is left as is (renorm only shrinks)."""
    v_c = torch.tensor([[3.0, 4.0]])
    v_t = torch.tensor([[4.5, 6.0]])  # u = 2 v_c - v_t = [1.5, 2], |u| = 2.5 < 5
    out = combine(v_c, v_t, None, 2.0, 1.0, renorm, 0.0)
    torch.testing.assert_close(out, torch.tensor([[1.5, 2.0]]), rtol=0, atol=0)


def test_renorm_min_bounds_the_shrink():
    """alpha = clamp(|v_c| / |u|, m, 1): with m = 0.75 the channel example's second token (alpha
    0.5) shrinks only to 0.75."""
    out = combine(V_C, V_T, None, 2.0, 1.0, "channel", 0.75)
    torch.testing.assert_close(out, torch.tensor([[3.0, 4.0], [0.0, 1.5]]), rtol=1e-6, atol=0)


def test_global_keeps_bf16_channel_promotes_to_fp32():
    """A 0-dim fp32 scale keeps bf16; a per-token [N, 1] scale promotes to fp32 (spec 11.9)."""
    g = torch.Generator().manual_seed(1)
    v_c, v_t, v_i = (torch.randn(6, 64, generator=g).to(torch.bfloat16) for _ in range(3))
    assert combine(v_c, v_t, None, 4.0, 1.0, "global", 0.0).dtype == torch.bfloat16
    assert combine(v_c, v_t, v_i, 4.0, 1.5, "global", 0.0).dtype == torch.bfloat16
    assert combine(v_c, v_t, None, 4.0, 1.0, "channel", 0.0).dtype == torch.float32
    assert combine(v_c, v_t, v_i, 4.0, 1.5, "channel", 0.0).dtype == torch.float32
    assert combine(v_c, v_t, None, 4.0, 1.0, "text_channel", 0.0).dtype == torch.float32
    assert combine(v_c, v_t, v_i, 4.0, 2.0, "text_channel", 0.0).dtype == torch.float32


def test_global_bf16_arithmetic_matches_reference_order():
    """The bf16 path: u and the product u * alpha are rounded to bf16, the norms are fp32."""
    g = torch.Generator().manual_seed(2)
    v_c, v_t = (torch.randn(6, 64, generator=g).to(torch.bfloat16) for _ in range(2))
    u = v_t + 4.0 * (v_c - v_t)
    alpha = (torch.linalg.vector_norm(v_c.float()) / (torch.linalg.vector_norm(u.float()) + 1e-8)).clamp(0.0, 1.0)
    assert torch.equal(combine(v_c, v_t, None, 4.0, 1.0, "global", 0.0), u * alpha)


def test_app_text2img_effective_scale():
    """The app's text2img (no think): cfg_img equals gen, so v_i = v_c and with img_scale 1.5
    w = v_c + 1.5 (s_t - 1)(v_c - v_t), an effective text scale of 5.5 (spec 6.5)."""
    g = torch.Generator().manual_seed(3)
    v_c, v_t = torch.randn(16, 64, generator=g), torch.randn(16, 64, generator=g)
    out = combine(v_c, v_t, v_c, 4.0, 1.5, "global", 1.0)  # renorm off: the value before renorm
    expected = v_c + 1.5 * (4.0 - 1) * (v_c - v_t)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, v_t + 5.5 * (v_c - v_t), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("renorm", ["local", "", "Global"])
def test_unknown_renorm_type(renorm):
    with pytest.raises(ValueError, match="cfg_renorm_type"):
        combine(V_C, V_T, None, 2.0, 1.0, renorm, 0.0)
    with pytest.raises(ValueError, match="cfg_renorm_type"):
        combine(V_C, V_T, None, 1.0, 1.0, renorm, 0.0)
