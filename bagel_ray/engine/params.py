"""The knobs as the engines take them: the sampler's (`DenoiseParams`) and text decoding's
(`DecodeParams`). Torch-free, so that the request type built on them (`engine/request.py`)
reaches the CPU-only ingress without the engines' torch and model code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bagel_ray.knobs import RENORM_TYPES


@dataclass(frozen=True)
class DenoiseParams:
    """Sampler knobs with the official notebook text2img defaults (names, ranges and the
    per-modality defaults: `bagel_ray.knobs`). `taylorseer` turns on the official TaylorSeer
    step cache (`enable_taylorseer`), which approximates the exact path with fewer forwards."""

    num_inference_steps: int = 50
    timestep_shift: float = 3.0
    cfg_text_scale: float = 4.0
    cfg_img_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    cfg_renorm_type: str = "global"
    cfg_renorm_min: float = 0.0
    taylorseer: bool = False  # the official `enable_taylorseer`: approximate most forwards (spec pitfall 20)

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if not math.isfinite(self.timestep_shift) or self.timestep_shift <= 0:
            raise ValueError(f"timestep_shift must be a finite number > 0, got {self.timestep_shift}")
        if self.cfg_renorm_type not in RENORM_TYPES:
            raise ValueError(f"cfg_renorm_type must be one of {RENORM_TYPES}, got {self.cfg_renorm_type!r}")
        lo, hi = self.cfg_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"cfg_interval must satisfy 0 <= lo <= hi <= 1, got {self.cfg_interval}")
        if not 0.0 <= self.cfg_renorm_min <= 1.0:
            raise ValueError(f"cfg_renorm_min must be in [0, 1], got {self.cfg_renorm_min}")


@dataclass(frozen=True)
class DecodeParams:
    """`max_new_tokens` counts generated tokens (the official `max_length` minus the leading
    `<|im_start|>`). do_sample=False is greedy, the official default (the knobs' temperature 0
    means it too); top_p=1.0 is the official (unfiltered) sampling."""

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 0.3
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"do_sample needs a temperature > 0, got {self.temperature} (temperature 0 is greedy "
                             f"decoding: leave do_sample off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
