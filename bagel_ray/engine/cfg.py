"""Classifier-free guidance combination and renormalisation (spec 6.4).

`v_c`: conditional velocity, `v_t`: cfg_text branch, `v_i`: cfg_img branch. Norms are L2 in
fp32 with eps 1e-8; the scale clamps to [renorm_min, 1], so renorm only shrinks. Dtypes follow
the reference: a global (0-dim) scale keeps the velocity's dtype, a per-token one promotes
to fp32.
"""

from __future__ import annotations

import torch

from bagel_ray.knobs import RENORM_TYPES
EPS = 1e-8


def _norm(x: torch.Tensor, per_token: bool) -> torch.Tensor:
    if per_token:
        return torch.linalg.vector_norm(x.float(), dim=-1, keepdim=True)
    return torch.linalg.vector_norm(x.float())


def _renorm_scale(reference: torch.Tensor, guided: torch.Tensor, per_token: bool, renorm_min: float) -> torch.Tensor:
    return (_norm(reference, per_token) / (_norm(guided, per_token) + EPS)).clamp(min=renorm_min, max=1.0)


def combine(
    v_c: torch.Tensor,
    v_t: torch.Tensor | None,
    v_i: torch.Tensor | None,
    text_scale: float,
    img_scale: float,
    renorm_type: str,
    renorm_min: float,
) -> torch.Tensor:
    """The guided velocity. `v_t` is needed when text_scale > 1, `v_i` when img_scale > 1;
    scales here are already gated by the CFG interval."""
    if renorm_type not in RENORM_TYPES:
        raise ValueError(f"cfg_renorm_type must be one of {RENORM_TYPES}, got {renorm_type!r}")
    if text_scale <= 1.0:
        return v_c
    use_img = img_scale > 1.0
    u = v_t + text_scale * (v_c - v_t)
    if renorm_type == "text_channel":
        u = u * _renorm_scale(v_c, u, True, renorm_min)
        return v_i + img_scale * (u - v_i) if use_img else u
    w = v_i + img_scale * (u - v_i) if use_img else u
    return w * _renorm_scale(v_c, w, renorm_type == "channel", renorm_min)
