"""The request flags shared by `bagel-ray generate` and `python -m bagel_ray.jobs.bulk`, and the
checks both run on their input before any weights load.

Each request flag's dest is the `GenerationRequest` field of the same name and defaults to None,
so the request model's per-modality official defaults apply; the help text reads them from
there. Bad input raises `UsageError`, which the commands report as one `error: ...` line.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Mapping

from PIL import Image

from bagel_ray.engine.cfg import RENORM_TYPES
from bagel_ray.engine.request import DEFAULT_SIZE, SAMPLER_DEFAULTS, GenerationRequest

# Flags whose dest is a GenerationRequest field, passed through when given.
REQUEST_FLAGS = (
    "seed", "steps", "height", "width", "cfg_text_scale", "cfg_img_scale", "cfg_interval",
    "cfg_renorm_type", "cfg_renorm_min", "timestep_shift", "think", "max_think_tokens",
    "max_tokens", "do_sample", "temperature", "top_p",
)
# DenoiseParams field behind each sampler flag (for the per-modality defaults in --help).
SAMPLER_FIELDS = {
    "steps": "num_timesteps", "cfg_text_scale": "cfg_text_scale", "cfg_img_scale": "cfg_img_scale",
    "cfg_interval": "cfg_interval", "cfg_renorm_type": "cfg_renorm_type",
    "cfg_renorm_min": "cfg_renorm_min", "timestep_shift": "timestep_shift",
}


class UsageError(Exception):
    """Bad input found by a command itself; reported as one line, exit code 2."""


def _request_default(name: str) -> str:
    return f"default: {GenerationRequest.__dataclass_fields__[name].default}"


def _sampler_default(flag: str) -> str:
    field = SAMPLER_FIELDS[flag]
    per_modality = ", ".join(f"{getattr(params, field)} for {m}" for m, params in SAMPLER_DEFAULTS.items())
    return f"default: {per_modality}"


def add_request_flags(parser: argparse.ArgumentParser, title: str) -> None:
    """One flag per entry of `REQUEST_FLAGS`, in an argument group called `title`."""
    req = parser.add_argument_group(title)
    req.add_argument("--seed", type=int, help=_request_default("seed"))
    req.add_argument("--steps", type=int,
                     help=f"num_timesteps; N steps run N-1 model evaluations ({_sampler_default('steps')})")
    req.add_argument("--height", type=int,
                     help=f"text2img only, a multiple of 16 (default: {DEFAULT_SIZE}, or the model's largest side if smaller)")
    req.add_argument("--width", type=int, help="as --height")
    req.add_argument("--cfg-text-scale", type=float, help=_sampler_default("cfg_text_scale"))
    req.add_argument("--cfg-img-scale", type=float, help=_sampler_default("cfg_img_scale"))
    req.add_argument("--cfg-interval", type=float, nargs=2, metavar=("LO", "HI"), help=_sampler_default("cfg_interval"))
    req.add_argument("--cfg-renorm-type", choices=RENORM_TYPES, help=_sampler_default("cfg_renorm_type"))
    req.add_argument("--cfg-renorm-min", type=float, help=_sampler_default("cfg_renorm_min"))
    req.add_argument("--timestep-shift", type=float, help=_sampler_default("timestep_shift"))
    req.add_argument("--think", action="store_true", default=None, help="decode a <think> plan first")
    req.add_argument("--max-think-tokens", type=int, help=_request_default("max_think_tokens"))
    req.add_argument("--max-tokens", type=int, help=f"new text tokens ({_request_default('max_tokens')})")
    req.add_argument("--do-sample", action="store_true", default=None, help="sample text instead of greedy decoding")
    req.add_argument("--temperature", type=float, help=_request_default("temperature"))
    req.add_argument("--top-p", type=float, help=_request_default("top_p"))


def request_fields(values: Mapping[str, Any]) -> dict[str, Any]:
    """The request fields among `values` (parsed flags, or one item of a bulk job) that are
    set, ready for `GenerationRequest(**...)`."""
    given = {name: values[name] for name in REQUEST_FLAGS if values.get(name) is not None}
    if "cfg_interval" in given:
        given["cfg_interval"] = tuple(given["cfg_interval"])
    return given


def read_image(path: Path | str | None) -> Image.Image | None:
    if path is None:
        return None
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # a missing file, one PIL cannot decode (UnidentifiedImageError), a corrupt one, or a
        # decompression bomb (more than twice PIL's MAX_IMAGE_PIXELS)
        raise UsageError(f"cannot read image {path}: {exc}") from exc


def fit_size(req: GenerationRequest, limit: int) -> GenerationRequest:
    """Check text2img's size against the model's largest image side and fill the default
    (1024, clamped to the model)."""
    if req.modality != "text2img":
        return req
    for name in ("height", "width"):
        value = getattr(req, name)
        if value is not None and value > limit:
            raise UsageError(f"{name} {value} is larger than this model's largest image side {limit}")
    default = min(DEFAULT_SIZE, limit)
    return dataclasses.replace(req, height=req.height or default, width=req.width or default)


def default_dtype(device: str) -> str:
    """bfloat16 on a GPU, float32 on the CPU."""
    return "bfloat16" if device.startswith("cuda") else "float32"
