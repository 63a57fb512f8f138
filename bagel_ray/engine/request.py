"""A generation request and its result, with the official defaults per modality (spec 6.5, 7.2).

Fields left as None take the default of the request's modality: the notebook's text2img
settings (cfg_img 1.0, interval [0.4, 1], global renorm) or its edit settings (cfg_img 2.0,
interval [0, 1], text_channel renorm). The serving layer validates user input into this.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from bagel_ray.engine.dit import DenoiseParams
from bagel_ray.engine.decoder import DecodeParams

MODALITIES = ("text2img", "img2img", "img2text", "text2text")
IMAGE_OUTPUT = ("text2img", "img2img")
IMAGE_INPUT = ("img2img", "img2text")

# Official notebook settings (spec 6.5): text2img and edit columns.
SAMPLER_DEFAULTS: dict[str, DenoiseParams] = {
    "text2img": DenoiseParams(50, 3.0, 4.0, 1.0, (0.4, 1.0), "global", 0.0),
    "img2img": DenoiseParams(50, 3.0, 4.0, 2.0, (0.0, 1.0), "text_channel", 0.0),
}
DEFAULT_SEED = 42  # the notebook's
DEFAULT_SIZE = 1024
DEFAULT_MAX_TOKENS = 512  # the app's understanding tab (max_new_tokens)
# The notebook's max_think_token_n = 1000 is a max_length that counts the leading
# <|im_start|>, so at most 999 tokens come out.
DEFAULT_MAX_THINK_TOKENS = 999
DEFAULT_TEMPERATURE = 0.3


@dataclass(frozen=True)
class GenerationRequest:
    modality: str
    prompt: str
    image: Image.Image | None = field(default=None, repr=False)
    seed: int = DEFAULT_SEED
    steps: int | None = None
    height: int | None = None
    width: int | None = None
    cfg_text_scale: float | None = None
    cfg_img_scale: float | None = None
    cfg_interval: tuple[float, float] | None = None
    cfg_renorm_type: str | None = None
    cfg_renorm_min: float | None = None
    timestep_shift: float | None = None
    think: bool = False
    max_think_tokens: int = DEFAULT_MAX_THINK_TOKENS
    max_tokens: int = DEFAULT_MAX_TOKENS
    do_sample: bool = False
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = 1.0
    init_noise: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"unknown modality {self.modality!r}; choose from {', '.join(MODALITIES)}")
        if self.modality in IMAGE_INPUT and self.image is None:
            raise ValueError(f"{self.modality} needs an input image")
        if self.modality not in IMAGE_INPUT and self.image is not None:
            raise ValueError(f"{self.modality} takes no input image")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.modality == "img2img" and (self.height is not None or self.width is not None):
            raise ValueError("img2img generates at the input image's size; height and width cannot be set")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 16 or value % 16):
                raise ValueError(f"{name} must be a positive multiple of 16, got {value}")
        if self.max_tokens < 1 or self.max_think_tokens < 1:
            raise ValueError("max_tokens and max_think_tokens must be >= 1")
        self.sampler()  # validates the sampler knobs of image modalities
        self.decode_params()

    @property
    def outputs_image(self) -> bool:
        return self.modality in IMAGE_OUTPUT

    def sampler(self) -> DenoiseParams | None:
        """The denoising knobs, defaults filled in (None for text modalities)."""
        if not self.outputs_image:
            return None
        base = SAMPLER_DEFAULTS[self.modality]
        given = {
            "num_timesteps": self.steps,
            "timestep_shift": self.timestep_shift,
            "cfg_text_scale": self.cfg_text_scale,
            "cfg_img_scale": self.cfg_img_scale,
            "cfg_interval": None if self.cfg_interval is None else tuple(self.cfg_interval),
            "cfg_renorm_type": self.cfg_renorm_type,
            "cfg_renorm_min": self.cfg_renorm_min,
        }
        return replace(base, **{k: v for k, v in given.items() if v is not None})

    def decode_params(self, think: bool = False) -> DecodeParams:
        return DecodeParams(
            max_new_tokens=self.max_think_tokens if think else self.max_tokens,
            do_sample=self.do_sample,
            temperature=self.temperature,
            top_p=self.top_p,
        )


@dataclass
class GenerationResult:
    modality: str
    prompt: str
    seed: int
    text: str | None = None
    token_ids: list[int] | None = None
    think_text: str | None = None
    think_token_ids: list[int] | None = None
    image: Image.Image | None = field(default=None, repr=False)
    latent_tokens: torch.Tensor | None = field(default=None, repr=False)
    finish_reason: str | None = None  # text: "stop" (predicted <|im_end|>) or "length"
    timings: dict[str, float] = field(default_factory=dict)
