"""Every request knob, defined once: name, type, range, official default, help and aliases.

Why one table: a knob used to be declared in five places under three names (`num_inference_steps`
over HTTP, `steps` on the CLI and in the request, `num_timesteps` in the DiT), each with its own
range check, so the same value could pass one door and fail another (or crash behind it). Now
the HTTP body model (`serve/schemas.py`), the CLI flags (`flags.py`), the bulk-job item keys
(`jobs/inputs.py`), the Python client's keywords (`client.py`), the request's own check
(`engine/request.py`) and the DiT's sampler defaults all read `KNOBS`. Adding a knob is one
entry here plus the engine field that uses it (see docs/ARCHITECTURE.md).

Names: OpenAI's where it has one (`max_tokens`, `temperature`, `top_p`, `seed`), else the
official BAGEL code's, else diffusers' (`num_inference_steps`). `aliases` are other names the
CLI and bulk items accept for a knob (`--steps`, from the upstream `end2end.py`); HTTP takes
the name and the knob's `http_aliases`, OpenAI's other names (`max_completion_tokens`). Types are strict everywhere: an integer knob takes no `true`, `"2"` or `2.0`; a
number takes integers but no booleans, strings, NaN or infinities.

This module imports nothing but the standard library (no torch): the CPU-only ingress reads it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

MAX_SEED = 2**63 - 1  # a seed must fit a signed 64-bit integer (torch.Generator, JSON clients)
DEFAULT_SEED = 42  # the notebook's
DEFAULT_SIZE = 1024  # the model's largest side: an image is this square unless given
MAX_NEW_TOKENS = 32768
RENORM_TYPES = ("global", "channel", "text_channel")
IMAGE_OUT = ("text2img", "img2img")  # the modalities whose knobs have per-modality defaults

INT, FLOAT, BOOL, CHOICE, INTERVAL = "int", "float", "bool", "choice", "interval"
_INT_TEXT = re.compile(r"[+-]?\d+")
_TRUE, _FALSE = ("true",), ("false",)


@dataclass(frozen=True)
class Knob:
    """One request knob. `default` is the official value for every modality, or None when it
    differs per modality (`per_modality`, image modalities only). `sampler` knobs are fields
    of the DiT's `DenoiseParams`; `http=False` knobs reach the HTTP API another way (height and
    width as OpenAI's `size`)."""

    name: str
    kind: str  # INT, FLOAT, BOOL, CHOICE or INTERVAL (two numbers lo <= hi)
    help: str
    default: Any = None
    per_modality: Mapping[str, Any] = field(default_factory=dict)
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    multiple_of: int | None = None
    choices: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    sampler: bool = False
    http: bool = True
    http_default: Any = "same"  # the HTTP field's default when it differs ("same": `default`)
    http_aliases: tuple[str, ...] = ()  # other names HTTP bodies take (OpenAI's), not CLI flags or bulk keys

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def flags(self) -> tuple[str, ...]:
        return (self.flag, *("--" + a.replace("_", "-") for a in self.aliases))

    @property
    def http_field_default(self) -> Any:
        return self.default if self.http_default == "same" else self.http_default

    def default_text(self) -> str:
        """The official default as help text shows it."""
        if self.per_modality:
            return ", ".join(f"{_show(v)} for {m}" for m, v in self.per_modality.items())
        return _show(self.default)

    def range_text(self) -> str:
        low = f">= {_show(self.ge)}" if self.ge is not None else f"> {_show(self.gt)}" if self.gt is not None else None
        high = f"<= {_show(self.le)}" if self.le is not None else None
        parts = [p for p in (low, high) if p]
        if self.multiple_of:
            parts.append(f"a multiple of {self.multiple_of}")
        return " and ".join(parts)

    # -- validation: one place, whatever door the value came in by ---------------------

    def check(self, value: Any) -> Any:
        """`value` (as JSON or Python carries it) if it has this knob's exact type and lies in
        its range, else ValueError naming the knob. A list becomes a tuple for an interval."""
        if self.kind == INTERVAL:
            if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) for v in value)):
                raise ValueError(f"{self.name} must be a list of two numbers [lo, hi], got {_json(value)}")
            lo, hi = (self._bounded(float(v)) for v in value)
            if lo > hi:
                raise ValueError(f"{self.name} must be [lo, hi] with lo <= hi, got {_json(value)}")
            return (lo, hi)
        ok = {INT: lambda v: isinstance(v, int) and not isinstance(v, bool), FLOAT: _is_number,
              BOOL: lambda v: isinstance(v, bool), CHOICE: lambda v: isinstance(v, str)}[self.kind](value)
        if not ok:
            want = {INT: "an integer", FLOAT: "a number", BOOL: "true or false", CHOICE: "a string"}[self.kind]
            raise ValueError(f"{self.name} must be {want}, got {_json(value)}")
        if self.kind == CHOICE and value not in self.choices:
            raise ValueError(f"{self.name} must be one of {', '.join(self.choices)}, got {value!r}")
        if self.kind in (INT, FLOAT):
            self._bounded(value)
        return value

    def _bounded(self, value: float) -> float:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{self.name} must be a finite number, got {value}")
        if ((self.ge is not None and value < self.ge) or (self.gt is not None and value <= self.gt)
                or (self.le is not None and value > self.le) or (self.multiple_of and value % self.multiple_of)):
            raise ValueError(f"{self.name} must be {self.range_text()}, got {value}")
        return value

    def parse(self, text: str) -> Any:
        """A value written as text (a CLI argument, a form field), checked. An interval is
        'lo,hi' or '[lo, hi]'. Booleans are true or false."""
        text = text.strip()
        if self.kind == INT:
            if not _INT_TEXT.fullmatch(text):
                raise ValueError(f"{self.name} must be an integer, got {text!r}")
            return self.check(int(text))
        if self.kind == FLOAT:
            return self.check(_number(self.name, text))
        if self.kind == BOOL:
            if text.lower() not in _TRUE + _FALSE:
                raise ValueError(f"{self.name} must be true or false, got {text!r}")
            return self.check(text.lower() in _TRUE)
        if self.kind == INTERVAL:
            inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
            values = inner.split(",")
            if len(values) != 2:
                raise ValueError(f"{self.name} must be 'lo,hi' or '[lo, hi]', got {text!r}")
            return self.check([_number(self.name, v.strip()) for v in values])
        return self.check(text)

    def parse_one(self, text: str) -> float:
        """One bound of an interval written as text (the CLI takes `--cfg-interval LO HI`)."""
        return self._bounded(_number(self.name, text.strip()))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {text!r}")
    return value


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def _json(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value + '"'
    return repr(value)


def _both(text2img: Any, img2img: Any) -> dict[str, Any]:
    return dict(zip(IMAGE_OUT, (text2img, img2img)))


KNOBS: tuple[Knob, ...] = (
    # -- images: the DiT's sampler (official notebook settings, spec 6.5) ------------------
    Knob("num_inference_steps", INT, "denoising steps (the official num_timesteps); N steps run N-1 model evaluations",
         per_modality=_both(50, 50), ge=1, le=500, aliases=("steps",), sampler=True),
    Knob("cfg_text_scale", FLOAT, "text guidance scale", per_modality=_both(4.0, 4.0), ge=0, le=50, sampler=True),
    Knob("cfg_img_scale", FLOAT, "image guidance scale", per_modality=_both(1.0, 2.0), ge=0, le=50, sampler=True),
    Knob("cfg_interval", INTERVAL, "the part [lo, hi] of the timesteps (1 -> 0) where guidance is on",
         per_modality=_both((0.4, 1.0), (0.0, 1.0)), ge=0, le=1, sampler=True),
    Knob("cfg_renorm_type", CHOICE, "how the guided velocity is renormalised", per_modality=_both("global", "text_channel"),
         choices=RENORM_TYPES, sampler=True),
    Knob("cfg_renorm_min", FLOAT, "lower clamp of the renorm scale", per_modality=_both(0.0, 0.0), ge=0, le=1, sampler=True),
    Knob("timestep_shift", FLOAT, "shift of the timestep schedule", per_modality=_both(3.0, 3.0), gt=0, le=100, sampler=True),
    Knob("taylorseer", BOOL, "official TaylorSeer step cache (enable_taylorseer): fewer full forwards, approximates "
         "the exact path", default=False, sampler=True),
    # -- images: size (HTTP: OpenAI's `size`, "WxH") -------------------------------------
    Knob("height", INT, f"text2img only (default: {DEFAULT_SIZE}, or the model's largest side if smaller)",
         ge=16, multiple_of=16, http=False),
    Knob("width", INT, "as height", ge=16, multiple_of=16, http=False),
    # -- every modality ------------------------------------------------------------------
    Knob("seed", INT, "seed of the noise and of sampled text (HTTP: random when not given, and returned)",
         default=DEFAULT_SEED, ge=0, le=MAX_SEED, http_default=None),
    Knob("think", BOOL, "reason in text (a <think> plan) before the image or answer", default=False),
    # The notebook's max_think_token_n = 1000 is a max_length that counts the leading
    # <|im_start|>, so at most 999 tokens come out.
    Knob("max_think_tokens", INT, "most think tokens", default=999, ge=1, le=MAX_NEW_TOKENS),
    # -- text answers (and think text) ---------------------------------------------------
    Knob("max_tokens", INT, "most new text tokens (the official app's understanding tab)", default=512, ge=1, le=MAX_NEW_TOKENS,
         http_aliases=("max_completion_tokens",)),
    # HTTP: do_sample left out samples when a temperature above 0 is given (an OpenAI
    # client's `temperature` means sampling), and is greedy, the official default, when none
    # is. Temperature 0 is greedy decoding wherever it is given (OpenAI's range is 0-2 and 0
    # its greedy end); do_sample on with temperature 0 contradicts itself and is refused.
    Knob("do_sample", BOOL, "sample text instead of greedy decoding (HTTP: on when a temperature above 0 is given, "
         "unless false)", default=False, http_default=None),
    Knob("temperature", FLOAT, "sampling temperature (with do_sample); 0 is greedy decoding", default=0.3, ge=0, le=5,
         http_default=None),
    Knob("top_p", FLOAT, "nucleus sampling mass (with do_sample)", default=1.0, gt=0, le=1),
)


def by_name(table: tuple[Knob, ...] | None = None) -> dict[str, Knob]:
    """Knobs (of `table`, default `KNOBS` as it is now) by name and by alias."""
    names: dict[str, Knob] = {}
    for knob in KNOBS if table is None else table:
        for name in (knob.name, *knob.aliases):
            if name in names:
                raise ValueError(f"knob name {name!r} is defined twice")
            names[name] = knob
    return names


def canonical(fields: Mapping[str, Any], table: tuple[Knob, ...] | None = None) -> dict[str, Any]:
    """`fields` with aliases replaced by the knob's name (ValueError if both are given);
    fields that are no knob pass through unchanged."""
    names, out = by_name(table), {}
    for key, value in fields.items():
        knob = names.get(key)
        name = knob.name if knob is not None else key
        if name in out:
            raise ValueError(f"{key} and {name} are the same knob; give one")
        out[name] = value
    return out


def sampler_defaults(modality: str, table: tuple[Knob, ...] | None = None) -> dict[str, Any]:
    """The official sampler settings of an image modality, by knob name."""
    return {k.name: k.per_modality.get(modality, k.default) for k in (KNOBS if table is None else table) if k.sampler}


BY_NAME = by_name()
