"""A generation request and its result, with the official defaults per modality (spec 6.5, 7.2).

Fields left as None take the default of the request's modality: the notebook's text2img
settings (cfg_img 1.0, interval [0.4, 1], global renorm) or its edit settings (cfg_img 2.0,
interval [0, 1], text_channel renorm). The knob fields, their ranges and defaults are those of
`bagel_ray.knobs`, and a request checks each of them there, so a request made by the CLI, a
bulk item, a Serve handle or the HTTP API is held to the same rules. Nothing here imports
torch: the ingress, which has none, builds these requests and reads their results.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from PIL import Image

from bagel_ray.engine.params import DecodeParams, DenoiseParams
from bagel_ray.knobs import BY_NAME, DEFAULT_SEED, KNOBS, sampler_defaults
from bagel_ray.routes import IMAGE_OUTPUT, route

if TYPE_CHECKING:  # torch-free at run time: the CPU-only ingress builds requests and reads results
    import torch

# Official notebook settings (spec 6.5): the text2img and edit columns, by knob name.
SAMPLER_DEFAULTS: dict[str, DenoiseParams] = {m: DenoiseParams(**sampler_defaults(m)) for m in IMAGE_OUTPUT}
SAMPLER_KNOBS = tuple(k.name for k in KNOBS if k.sampler)
MAX_PARTIAL_IMAGES = 3  # OpenAI's bound


def preview_steps(total: int, count: int) -> frozenset[int]:
    """The step indices (0-based, of `total` model evaluations) after which `count` previews are
    made, evenly spaced and never the last (the final image follows it)."""
    return frozenset(max(0, round(total * (i + 1) / (count + 1)) - 1) for i in range(count))


@dataclass(frozen=True)
class GenerationRequest:
    modality: str
    prompt: str
    image: Image.Image | None = field(default=None, repr=False)
    # The knobs (bagel_ray.knobs; None: the modality's official default).
    seed: int = DEFAULT_SEED
    num_inference_steps: int | None = None
    height: int | None = None
    width: int | None = None
    cfg_text_scale: float | None = None
    cfg_img_scale: float | None = None
    cfg_interval: tuple[float, float] | None = None
    cfg_renorm_type: str | None = None
    cfg_renorm_min: float | None = None
    timestep_shift: float | None = None
    taylorseer: bool = BY_NAME["taylorseer"].default
    think: bool = BY_NAME["think"].default
    max_think_tokens: int = BY_NAME["max_think_tokens"].default
    max_tokens: int = BY_NAME["max_tokens"].default
    do_sample: bool = BY_NAME["do_sample"].default
    temperature: float = BY_NAME["temperature"].default
    top_p: float = BY_NAME["top_p"].default
    init_noise: torch.Tensor | None = field(default=None, repr=False)
    # What comes before `image` and `prompt` in the model's interleaved input, in order: text
    # segments and images, as the official `interleave_inference` takes a list of inputs
    # (a chat's system message and earlier turns; the other images of a turn).
    context: tuple[str | Image.Image, ...] = field(default=(), repr=False)
    # Not a knob (it changes nothing in the result): previews of the x0 estimate that a streamed
    # image request's progress events carry, at evenly spaced steps (`preview_steps`).
    partial_images: int = 0
    # The result's `latent_tokens` leave a DiT replica only when asked: an HTTP answer is a PNG.
    return_latents: bool = field(default=True, repr=False)
    # Its input images were made into contexts on another stage and left behind (`for_render`).
    image_in_contexts: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        path = route(self.modality)
        object.__setattr__(self, "context", tuple(self.context))
        if not all(isinstance(item, (str, Image.Image)) for item in self.context):
            raise ValueError("context items must be texts or images")
        has_image = bool(self.images)
        if path.image_in and not has_image and not self.image_in_contexts:
            raise ValueError(f"{self.modality} needs an input image")
        if not path.image_in and has_image:
            raise ValueError(f"{self.modality} takes no input image")
        for knob in KNOBS:
            value = getattr(self, knob.name)
            if value is not None:
                object.__setattr__(self, knob.name, knob.check(value))  # an interval given as a list becomes a tuple
        if not 0 <= self.partial_images <= MAX_PARTIAL_IMAGES or (self.partial_images and not path.image_out):
            raise ValueError(f"partial_images is 0-{MAX_PARTIAL_IMAGES}, for image output")
        if path.size_from_input and (self.height is not None or self.width is not None):
            raise ValueError(f"{self.modality} generates at the input image's size; height and width cannot be set")
        self.sampler()  # the sampler's own checks of image modalities
        self.decode_params()

    def for_render(self) -> GenerationRequest:
        """The request as the DiT needs it to render over contexts another stage built: the
        input image (an edit's largest part, megabytes of pixels) is left out, since those
        contexts hold all the DiT uses of it. A request with images in its context keeps them:
        the DiT draws the initial noise after replaying every image's VAE posterior draw, as the
        Thinker did, and needs their sizes."""
        if self.image is None or any(isinstance(item, Image.Image) for item in self.context):
            return self  # several images: the DiT replays each one's VAE draw to make the noise
        return replace(self, image=None, image_in_contexts=True)

    @property
    def inputs(self) -> tuple[str | Image.Image, ...]:
        """Everything before the prompt, in order: the context, then the image."""
        return self.context if self.image is None else (*self.context, self.image)

    @property
    def images(self) -> list[Image.Image]:
        return [item for item in self.inputs if isinstance(item, Image.Image)]

    @property
    def outputs_image(self) -> bool:
        return route(self.modality).image_out

    def sampler(self) -> DenoiseParams | None:
        """The denoising knobs, defaults filled in (None for text modalities)."""
        if not self.outputs_image:
            return None
        given = {name: getattr(self, name) for name in SAMPLER_KNOBS}
        return replace(SAMPLER_DEFAULTS[self.modality], **{k: v for k, v in given.items() if v is not None})

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
    prompt_tokens: int | None = None  # rows of the context decoded or denoised from (image rows included)
    timings: dict[str, float] = field(default_factory=dict)
