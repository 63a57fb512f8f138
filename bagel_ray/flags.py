"""The request flags shared by `bagel-ray generate` and `python -m bagel_ray.jobs.bulk`, and the
checks both run on their input before any weights load.

One flag per knob of `bagel_ray.knobs.KNOBS`, named after it (`--num-inference-steps`, plus its
aliases such as `--steps`), whose dest is the `GenerationRequest` field of the same name. Each
defaults to None, so the request model's per-modality official defaults apply; the help text
reads them from the knob. A value of the wrong type or out of the knob's range ends with
argparse's one `error: ...` line and exit code 2, as other bad input (`UsageError`) does.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

from PIL import Image

from bagel_ray.engine.request import GenerationRequest
from bagel_ray.knobs import BOOL, CHOICE, DEFAULT_SIZE, INT, INTERVAL, KNOBS, Knob, canonical
from bagel_ray.routes import route


class UsageError(Exception):
    """Bad input found by a command itself; reported as one line, exit code 2."""


def _parser_of(knob: Knob, one: bool = False) -> Callable[[str], Any]:
    """argparse's `type`: the knob's own text parser, its ValueError turned into argparse's
    one-line error."""

    def parse(text: str) -> Any:
        try:
            return knob.parse_one(text) if one else knob.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def add_request_flags(parser: argparse.ArgumentParser, title: str, table: tuple[Knob, ...] | None = None) -> None:
    """One flag per knob of `table` (default: `KNOBS`), in an argument group called `title`."""
    req = parser.add_argument_group(title)
    for knob in KNOBS if table is None else table:
        notes = [f"default: {knob.default_text()}"] if knob.default is not None or knob.per_modality else []
        notes += [knob.range_text()] if knob.range_text() else []
        help = f"{knob.help} ({'; '.join(notes)})" if notes else knob.help
        if knob.kind == BOOL:
            req.add_argument(*knob.flags, dest=knob.name, action="store_true", default=None, help=help)
        elif knob.kind == CHOICE:
            req.add_argument(*knob.flags, dest=knob.name, choices=knob.choices, help=help)
        elif knob.kind == INTERVAL:
            req.add_argument(*knob.flags, dest=knob.name, type=_parser_of(knob, one=True), nargs=2, metavar=("LO", "HI"),
                             help=help)
        else:
            req.add_argument(*knob.flags, dest=knob.name, type=_parser_of(knob), metavar="N" if knob.kind == INT else "X",
                             help=help)


def request_fields(values: Mapping[str, Any], table: tuple[Knob, ...] | None = None) -> dict[str, Any]:
    """The knobs among `values` (parsed flags, or one item of a bulk job, whose aliases are
    taken as their knob's name) that are set and valid, ready for `GenerationRequest(**...)`;
    ValueError naming the first bad one."""
    values = canonical(values, table)
    return {k.name: k.check(values[k.name]) for k in (KNOBS if table is None else table) if values.get(k.name) is not None}


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
    path = route(req.modality)
    if not path.image_out or path.size_from_input:
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
