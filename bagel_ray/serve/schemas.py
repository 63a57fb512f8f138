"""HTTP request bodies (OpenAI-compatible, plus every BAGEL knob as a typed top-level field)
and their mapping onto `GenerationRequest`.

Unknown fields and out-of-range values are rejected (422 naming the field). Knobs left out
take the official default of the request's modality (spec 6.5); for the CFG scales, the
interval and the renorm type that default differs between text2img and img2img.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from typing import Annotated, Any, Literal

from PIL import Image, UnidentifiedImageError
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, create_model, field_validator, model_validator
from pydantic import Strict as Exact

from bagel_ray.engine.request import MAX_PARTIAL_IMAGES, GenerationRequest
from bagel_ray.knobs import BOOL, CHOICE, FLOAT, INT, INTERVAL, KNOBS, MAX_SEED, Knob
from bagel_ray.png import encode_png
from bagel_ray.serve.errors import InputError

ALLOWED_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MAX_INPUT_IMAGES = 4  # images in one chat request (vllm-omni's bound): each is a ViT block (and a VAE one for edits)
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096
_DATA_URL = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,(?P<data>.*)$", re.DOTALL)
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


def _encodable(text: str) -> str:
    """JSON can carry lone UTF-16 surrogates ("\\ud800"), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not valid Unicode text ({exc.reason} at position {exc.start})") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def knob_field(knob: Knob) -> tuple[Any, Any]:
    """The pydantic (annotation, Field) of a knob: its strict type, its bounds (for the OpenAPI
    schema too) and, after them, the knob's own check, so HTTP refuses what the CLI and bulk
    jobs refuse."""
    if knob.kind == INTERVAL:
        bound = Annotated[float, Exact(), Field(ge=knob.ge, le=knob.le, allow_inf_nan=False)]
        kind: Any = tuple[bound, bound]
        limits: dict[str, Any] = {}
    else:
        kind = {INT: int, FLOAT: float, BOOL: bool, CHOICE: Literal[knob.choices]}[knob.kind]  # type: ignore[index]
        limits = {"strict": knob.kind != CHOICE or None,  # a Literal is exact already
                  "ge": knob.ge, "gt": knob.gt, "le": knob.le, "multiple_of": knob.multiple_of}
        if knob.kind == FLOAT:
            limits["allow_inf_nan"] = False
    default = knob.http_field_default
    if default is None:
        kind = kind | None
        official = knob.default_text() if knob.per_modality else None
    else:
        official = None
    description = knob.help if official is None else f"{knob.help} (default: {official})"
    check = AfterValidator(lambda value, knob=knob: value if value is None else knob.check(value))
    return Annotated[kind, check], Field(default, description=description, **{k: v for k, v in limits.items() if v is not None})


HTTP_KNOBS = {k.name: k for k in KNOBS if k.http}
_KnobFields = create_model("_KnobFields", __base__=Strict, **{name: knob_field(k) for name, k in HTTP_KNOBS.items()})


HTTP_ALIASES = {alias: k.name for k in HTTP_KNOBS.values() for alias in k.http_aliases}


class BagelKnobs(_KnobFields):
    """Every BAGEL knob (`bagel_ray.knobs.KNOBS`) as a typed top-level field. None = the
    official default for the request's modality (for `seed`: a random one)."""

    @model_validator(mode="before")
    @classmethod
    def _http_aliases(cls, data: Any) -> Any:
        """OpenAI's other names of a knob (`max_completion_tokens` for `max_tokens`)."""
        if not isinstance(data, dict) or not HTTP_ALIASES.keys() & data.keys():
            return data
        data = dict(data)
        for alias, name in HTTP_ALIASES.items():
            if alias in data:
                if name in data:
                    raise ValueError(f"{alias} and {name} are the same knob; give one")
                data[name] = data.pop(alias)
        return data

    def request(self, modality: str, prompt: str, image: Image.Image | None, seed: int,
                height: int | None = None, width: int | None = None,
                context: tuple[str | Image.Image, ...] = (), partial_images: int = 0) -> GenerationRequest:
        given = {name: getattr(self, name) for name in HTTP_KNOBS if name != "seed"}
        if given["do_sample"] is None and given["temperature"] is not None:
            given["do_sample"] = given["temperature"] > 0  # an OpenAI client's temperature samples; 0 is greedy
        try:
            return GenerationRequest(modality=modality, prompt=prompt, image=image, seed=seed, height=height, width=width,
                                     context=context, partial_images=partial_images, return_latents=False, **{k: v for k, v in given.items() if v is not None})
        except ValueError as exc:
            raise InputError(str(exc), status=422) from exc


class ImageURL(Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(Strict):
    type: Literal["text"]
    text: Text


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart | ImagePart] | None = None
    name: str | None = None

    def parts(self) -> tuple[list[str], str]:
        """(its image URLs, its text parts joined by newlines)."""
        if self.content is None or isinstance(self.content, str):
            return [], self.content or ""
        texts = [p.text for p in self.content if isinstance(p, TextPart)]
        return [p.image_url.url for p in self.content if isinstance(p, ImagePart)], "\n".join(texts)


class StreamOptions(Strict):
    include_usage: bool = False


class ChatCompletionRequest(BagelKnobs):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    modalities: list[Literal["text", "image"]] = Field(default_factory=lambda: ["text"], min_length=1, max_length=1)
    size: str | None = Field(None, description="WxH of a generated image; default 1024x1024 (the model's largest)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    partial_images: int | None = Field(None, strict=True, ge=0, le=MAX_PARTIAL_IMAGES,
                                       description="image output with stream: previews in the progress events")
    n: int = Field(1, ge=1, le=1)
    user: str | None = None

    def interleaved(self) -> tuple[list[tuple[str, str]], str | None, str]:
        """The messages as BAGEL's interleaved input (it has no chat template, so no role tags):
        each message in order gives its images (ViT blocks, and VAE blocks for image output),
        then its text parts joined by newlines as one `<|im_start|>text<|im_end|>` segment,
        as `interleave_inference` takes a list of inputs. The last message, the user's, ends
        the list: its text is the prompt and its last image the request's image. Returns
        (context as ("text" | "image", text or URL) items, the image URL, the prompt)."""
        *earlier, last = self.messages
        if last.role != "user":
            raise InputError(f"the last message must be the user's (got role {last.role!r})", "messages")
        context: list[tuple[str, str]] = []
        for message in earlier:
            urls, text = message.parts()
            if urls and message.role != "user":
                raise InputError(f"only user messages may hold images (a {message.role} message has one)", "messages")
            context += [("image", url) for url in urls]
            if text:
                context.append(("text", text))
        urls, prompt = last.parts()
        context += [("image", url) for url in urls[:-1]]
        if sum(kind == "image" for kind, _ in context) + bool(urls) > MAX_INPUT_IMAGES:
            raise InputError(f"at most {MAX_INPUT_IMAGES} images per request", "messages")
        return context, (urls[-1] if urls else None), prompt


# OpenAI's `quality` as denoising steps: auto/high/hd/standard are the official 50; medium and
# low trade detail for time (the step count sets the DiT's cost: 30 steps ~60 %, 20 ~40 %).
QUALITY_STEPS = {"auto": None, "standard": None, "hd": None, "high": None, "medium": 30, "low": 20}
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


class ImagesRequest(BagelKnobs):
    """What the two image endpoints share: `n` images, made with seeds seed, seed+1, ..."""

    prompt: Text = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, strict=True, ge=1, le=8, description="images generated with seeds seed, seed+1, ..., seed+n-1")
    quality: Literal[tuple(QUALITY_STEPS)] | None = Field(  # type: ignore[valid-type]
        None, description="denoising steps: low 20, medium 30, high/hd/standard/auto the official 50; "
                          "num_inference_steps sets them exactly")
    output_format: Literal[tuple(OUTPUT_FORMATS)] = "png"  # type: ignore[valid-type]
    output_compression: int | None = Field(None, strict=True, ge=0, le=100,
                                           description="jpeg/webp quality in percent (default 100)")
    background: Literal["auto", "opaque", "transparent"] | None = Field(
        None, description="BAGEL's images are opaque: auto and opaque are accepted, transparent is refused")
    moderation: Literal["auto", "low"] | None = Field(
        None, description="this server runs no moderation model: low is accepted, auto is refused")
    response_format: Literal["b64_json", "url"] = "b64_json"
    stream: bool = Field(False, strict=True, description="server-sent events: partial images, then the image")
    partial_images: int | None = Field(None, strict=True, ge=0, le=MAX_PARTIAL_IMAGES,
                                       description="previews of the image being denoised (with stream), evenly spaced")
    user: str | None = None

    @field_validator("partial_images")
    @classmethod
    def _streamed(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("stream"):
            raise ValueError("partial_images needs stream=true")
        return value

    @field_validator("quality")
    @classmethod
    def _quality_or_steps(cls, quality: str | None, info: ValidationInfo) -> str | None:
        if quality is not None and QUALITY_STEPS[quality] is not None and info.data.get("num_inference_steps") is not None:
            raise ValueError("give quality or num_inference_steps, not both (quality sets the steps)")
        return quality

    @field_validator("output_compression")
    @classmethod
    def _compression_is_lossy(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("output_format", "png") == "png":
            raise ValueError("output_compression applies to jpeg and webp; png is lossless")
        return value

    @field_validator("background")
    @classmethod
    def _opaque(cls, value: str | None) -> str | None:
        if value == "transparent":
            raise ValueError("BAGEL generates opaque RGB images (no alpha channel): use auto or opaque")
        return value

    @field_validator("moderation")
    @classmethod
    def _no_moderation(cls, value: str | None) -> str | None:
        if value == "auto":
            raise ValueError("this server runs no moderation model, so it cannot moderate: send low or leave it out")
        return value

    @field_validator("response_format")
    @classmethod
    def _inline(cls, value: str) -> str:
        if value == "url":
            raise ValueError("url is not served: this server keeps no images after answering, so they come back "
                             "inline as b64_json")
        return value

    @model_validator(mode="after")
    def _steps_of_quality(self) -> "ImagesRequest":
        if self.quality is not None and QUALITY_STEPS[self.quality] is not None:
            self.num_inference_steps = QUALITY_STEPS[self.quality]
        return self

    def encode(self, image: Image.Image) -> str:
        """An output image as base64 in the requested format."""
        if self.output_format == "png":
            return png_base64(image)
        buf = io.BytesIO()
        quality = 100 if self.output_compression is None else self.output_compression
        image.convert("RGB").save(buf, format=OUTPUT_FORMATS[self.output_format], quality=quality)
        return base64.b64encode(buf.getvalue()).decode("ascii")

    @field_validator("n")
    @classmethod
    def _seeds_fit(cls, n: int, info: ValidationInfo) -> int:
        """The seeds used are returned, so each must be one a client can send back."""
        seed = info.data.get("seed")
        if seed is not None and seed + n - 1 > MAX_SEED:
            raise ValueError(f"the images' seeds seed..seed+n-1 must stay <= 2**63-1; with n={n}, seed must be "
                             f"<= {MAX_SEED - n + 1}")
        return n

    def seeds(self, first: int) -> range:
        return range(first, first + self.n)


class ImageGenerationRequest(ImagesRequest):
    size: str | None = Field(None, description="WxH, or auto: the official default (1024x1024, or the model's largest)")


class ImageEditRequest(ImagesRequest):
    """Form fields of /v1/images/edits besides the image files. The output has the last input
    image's (VAE-resized) size, so `size` can only be auto."""

    size: Literal["auto"] | None = Field(None, description="auto only: an edit comes out at its input's VAE-resized size")

    @classmethod
    def from_form(cls, fields: dict[str, str]) -> "ImageEditRequest":
        """Form fields are text: each knob's is parsed as the CLI parses its flag (an interval as
        'lo,hi' or '[lo, hi]', a boolean as true/false), then validated as a JSON body is."""
        typed: dict[str, Any] = {}
        for key, text in fields.items():
            try:
                if key in HTTP_KNOBS:
                    typed[key] = HTTP_KNOBS[key].parse(text)
                elif key in ("n", "output_compression", "partial_images"):
                    typed[key] = int(text) if text.strip().lstrip("+-").isdigit() else text
                elif key == "stream":
                    typed[key] = {"true": True, "false": False}.get(text.strip().lower(), text)
                else:
                    typed[key] = text
            except ValueError as exc:
                raise InputError(str(exc), key, 422) from None
        return cls.model_validate(typed)


class ErrorDetail(BaseModel):
    message: str
    type: Literal["invalid_request_error", "server_error"]
    param: str | None = Field(None, description="the field the error concerns, when there is one")
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx answer of the API (OpenAI's error shape)."""

    error: ErrorDetail


def parse_size(size: str | None, max_side: int, stride: int) -> tuple[int | None, int | None]:
    """'WxH' -> (height, width), checked against the model; None or 'auto': (None, None).
    A malformed size, or a side that is no multiple of the stride, is a 422 like any bad
    value; a size past what the model can make is a 400 naming its limit, as OpenAI answers
    a size its model does not offer."""
    if size is None or size == "auto":
        return None, None
    m = _SIZE.fullmatch(size)
    if not m:
        raise InputError(f"size must be 'auto' or look like '1024x768' (width x height), got {size!r}", "size", 422)
    width, height = int(m.group(1)), int(m.group(2))
    for side in (width, height):
        if side < stride or side % stride:
            raise InputError(f"size {size}: each side must be a multiple of {stride} between {stride} and {max_side}", "size", 422)
    if max(width, height) > max_side:
        raise InputError(f"size {size} is beyond the model's limit: its largest side is {max_side} pixels, so each side "
                         f"must be at most {max_side}", "size", 400)
    return height, width


def decode_image(data: bytes, param: str, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Bytes of an uploaded image -> a fully decoded PIL image, within the limits. The pixel
    count is checked from the header, before anything is decompressed."""
    if len(data) > max_bytes:
        raise InputError(f"image is {len(data)} bytes, the limit is {max_bytes}", param, 413)
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_IMAGE_FORMATS)  # no other decoder is even tried
    except UnidentifiedImageError:
        raise InputError(f"not an image in an accepted format ({', '.join(ALLOWED_IMAGE_FORMATS)})", param) from None
    except Image.DecompressionBombError as exc:
        raise InputError(f"image is too large: {exc}", param, 413) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"cannot decode the image: {exc}", param) from None
    if image.width * image.height > max_pixels:
        raise InputError(f"image has {image.width * image.height} pixels, the limit is {max_pixels}", param, 413)
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InputError(f"cannot decode the image: {exc}", param) from None
    return image


def decode_data_url(url: str, param: str, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Images come inline only: no server-side paths and no fetching of remote URLs."""
    m = _DATA_URL.match(url)
    if not m:
        raise InputError("images must be data URLs (data:image/png;base64,...); remote URLs and paths are not fetched", param)
    if len(m.group("data")) > (max_bytes + 2) // 3 * 4 + 4:
        raise InputError(f"the image data URL is larger than {max_bytes} bytes decoded", param, 413)
    try:
        data = base64.b64decode(m.group("data"), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"invalid base64 in the image data URL: {exc}", param) from exc
    return decode_image(data, param, max_bytes, max_pixels)


def png_base64(image: Image.Image) -> str:
    """Lossless at zlib level 1: on the response's critical path, level 6 takes ~4x longer
    (39 against 9 ms for a smooth 512^2 image with PIL) for a ~35 % smaller file."""
    return base64.b64encode(encode_png(image, level=1)).decode("ascii")
