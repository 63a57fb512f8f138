"""The knob table (`bagel_ray.knobs`) is the one definition behind every door: the HTTP body
model, the CLI flags, the bulk item keys, the client and the request's own check accept and
refuse the same values, and a knob added to the table alone reaches all of them."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import fields

import pytest
from pydantic import ValidationError

from bagel_ray import knobs
from bagel_ray.engine.dit import DenoiseParams
from bagel_ray.engine.request import SAMPLER_DEFAULTS, GenerationRequest
from bagel_ray.flags import add_request_flags, request_fields
from bagel_ray.jobs.inputs import ITEM_KEYS, Item, ItemError, JobInput, build_request
from bagel_ray.knobs import BOOL, CHOICE, FLOAT, INT, INTERVAL, KNOBS
from bagel_ray.serve.schemas import BagelKnobs, ImageGenerationRequest
from tests.conftest import REPO_ROOT


def probes(knob: knobs.Knob) -> list:
    """Values on both sides of each bound, and of every wrong JSON type (None is "not given"
    at every door)."""
    wrong = ["2", [], {}]
    if knob.kind == INTERVAL:
        return [[0, 1], [0.4, 1.0], [0.5, 0.5], [0.9, 0.1], [-0.1, 1], [0, 1.1], [0.5], [0, True], [0, "1"], [0, float("nan")],
                (0.2, 0.3), 0.5, True]
    if knob.kind == BOOL:
        return [True, False, 1, 0, "true", 1.0]
    if knob.kind == CHOICE:
        return [*knob.choices, "none", 3, True]
    out = [True, False, float("nan"), float("inf"), 2**70, -(2**70), *wrong]
    for bound in (knob.ge, knob.gt, knob.le):
        if bound is not None:
            out += [bound, bound - 1, bound + 1, float(bound), bound - 0.5, bound + 0.5]
    if knob.multiple_of:
        out += [knob.multiple_of * 3, knob.multiple_of * 3 + 1]
    return out


def accepted_by_check(knob, value) -> bool:
    try:
        knob.check(value)
        return True
    except ValueError:
        return False


def test_every_knob_is_a_field_of_every_door():
    http = set(BagelKnobs.model_fields)
    request = {f.name for f in fields(GenerationRequest)}
    sampler = {f.name for f in fields(DenoiseParams)}
    parser = argparse.ArgumentParser()
    add_request_flags(parser, "knobs")
    dests = {a.dest for a in parser._actions}
    for knob in KNOBS:
        assert (knob.name in http) == knob.http, knob.name
        assert knob.name in request and knob.name in dests and knob.name in ITEM_KEYS, knob.name
        assert set(knob.aliases) <= ITEM_KEYS
        assert (knob.name in sampler) == knob.sampler, knob.name
    # and nothing else: no door has a knob the table lacks
    assert http - {k.name for k in KNOBS} == set()
    assert sampler == {k.name for k in KNOBS if k.sampler}


@pytest.mark.parametrize("knob", KNOBS, ids=lambda k: k.name)
def test_every_door_accepts_and_refuses_the_same_values(knob, tmp_path):
    """HTTP (strict pydantic), a bulk item, a GenerationRequest and the knob's check agree on
    every probe; a value one door takes, the others take too."""
    job = JobInput(str(tmp_path / "in.jsonl"), "text2img", {})
    for value in probes(knob):
        want = accepted_by_check(knob, value)
        doors = {}
        if knob.http:
            doors["http"] = _takes(lambda: BagelKnobs.model_validate({knob.name: value}))
        doors["bulk"] = _takes(lambda: build_request(Item("x", 1, {"id": "x", "prompt": "p", knob.name: value}), job))
        doors["request"] = _takes(lambda: GenerationRequest("text2img", "p", **{knob.name: value}))
        assert set(doors.values()) == {want}, (knob.name, value, want, doors)


def _takes(make) -> bool:
    try:
        make()
        return True
    except (ValueError, ItemError):  # pydantic's ValidationError is a ValueError
        return False


@pytest.mark.parametrize("knob", [k for k in KNOBS if k.kind in (INT, FLOAT)], ids=lambda k: k.name)
def test_the_cli_parses_as_json_checks(knob):
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_request_flags(parser, "knobs")
    for value in probes(knob):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        text = repr(value) if isinstance(value, float) else str(value)
        try:
            parsed = getattr(parser.parse_args([knob.flag, text]), knob.name)
        except (argparse.ArgumentError, SystemExit):
            parsed = None
        # text has no types: "2.0" is a float, so an integer knob refuses it as JSON 2.0 is refused
        assert (parsed is not None) == accepted_by_check(knob, value), (knob.name, text)


def test_sampler_defaults_are_the_official_ones_by_name():
    assert SAMPLER_DEFAULTS["text2img"] == DenoiseParams(
        num_inference_steps=50, timestep_shift=3.0, cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_interval=(0.4, 1.0),
        cfg_renorm_type="global", cfg_renorm_min=0.0, taylorseer=False)
    assert SAMPLER_DEFAULTS["img2img"] == DenoiseParams(
        num_inference_steps=50, timestep_shift=3.0, cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0),
        cfg_renorm_type="text_channel", cfg_renorm_min=0.0, taylorseer=False)


def test_taylorseer_reaches_the_sampler():
    assert GenerationRequest("text2img", "p").sampler().taylorseer is False
    assert GenerationRequest("img2img", "p", image=_image(), taylorseer=True).sampler().taylorseer is True
    assert BagelKnobs.model_validate({"taylorseer": True}).request("text2img", "p", None, 1).sampler().taylorseer is True


def _image():
    from PIL import Image

    return Image.new("RGB", (32, 32))


def test_aliases_are_one_knob():
    assert request_fields({"steps": 3}) == {"num_inference_steps": 3}
    with pytest.raises(ValueError, match="the same knob"):
        request_fields({"steps": 3, "num_inference_steps": 4})
    with pytest.raises(ValidationError):  # HTTP takes only the name
        BagelKnobs.model_validate({"steps": 3})


def _sampling(make) -> bool | str:
    """Whether the request `make` builds samples its text, or the refusal's message."""
    try:
        return make().decode_params().do_sample
    except (ValueError, ItemError) as exc:
        return str(exc)


def test_temperature_zero_is_greedy_at_every_door(tmp_path):
    """OpenAI's temperature runs 0-2 and 0 is its greedy end: every door takes 0 and decodes
    greedily; a temperature above 0 samples over HTTP (an OpenAI client means it so) and with
    do_sample elsewhere; do_sample with temperature 0 is a contradiction, refused everywhere."""
    job = JobInput(str(tmp_path / "in.jsonl"), "text2text", {})
    parser = argparse.ArgumentParser()
    add_request_flags(parser, "knobs")

    def doors(**given):
        flag = {k: "--" + k.replace("_", "-") for k in given}  # a boolean flag is on or left out
        flags = [a for k, v in given.items() if v is not False for a in ([flag[k]] if v is True else [flag[k], str(v)])]
        return {
            "http": _sampling(lambda: BagelKnobs.model_validate(given).request("text2text", "p", None, 1)),
            "bulk": _sampling(lambda: build_request(Item("x", 1, {"id": "x", "prompt": "p", **given}), job)),
            "request": _sampling(lambda: GenerationRequest("text2text", "p", **given)),
            "cli": _sampling(lambda: GenerationRequest("text2text", "p",
                                                       **request_fields(vars(parser.parse_args(flags))))),
        }

    assert knobs.BY_NAME["temperature"].check(0) == 0 and knobs.BY_NAME["temperature"].parse("0") == 0.0
    assert doors(temperature=0) == dict.fromkeys(("http", "bulk", "request", "cli"), False)
    assert doors(temperature=0.0, do_sample=False) == dict.fromkeys(("http", "bulk", "request", "cli"), False)
    assert doors() == dict.fromkeys(("http", "bulk", "request", "cli"), False)  # the official greedy default
    assert doors(temperature=0.7) == {"http": True, "bulk": False, "request": False, "cli": False}
    assert doors(temperature=0.7, do_sample=True) == dict.fromkeys(("http", "bulk", "request", "cli"), True)
    refused = doors(temperature=0, do_sample=True)
    assert all("do_sample needs a temperature > 0" in str(v) for v in refused.values()), refused
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        knobs.BY_NAME["temperature"].check(-0.1)


def test_seeds_of_n_images_stay_in_range():
    top = knobs.MAX_SEED
    assert list(ImageGenerationRequest(prompt="p", seed=top - 1, n=2).seeds(top - 1)) == [top - 1, top]
    with pytest.raises(ValidationError, match="seed must be <= 9223372036854775806"):
        ImageGenerationRequest(prompt="p", seed=top, n=2)
    with pytest.raises(ValidationError):
        ImageGenerationRequest(prompt="p", seed=top + 1)


def test_knobs_and_routes_import_no_torch():
    code = "import sys, bagel_ray.knobs, bagel_ray.routes; print(sorted(m for m in sys.modules if m.startswith(('torch', 'PIL'))))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), cwd=REPO_ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr + proc.stdout


# A knob added to the table only: every door takes it, with its range, and nothing else was edited.
# The "engine that uses it" is played by a GenerationRequest with one more field.
MADE_UP = textwrap.dedent('''
    import argparse, dataclasses, json, sys
    from bagel_ray import knobs
    knobs.KNOBS = knobs.KNOBS + (knobs.Knob("made_up_level", knobs.INT, "a knob no engine has yet", default=3, ge=1, le=9,
                                            aliases=("level",)),)
    knobs.BY_NAME = knobs.by_name(knobs.KNOBS)

    from bagel_ray.engine import request
    @dataclasses.dataclass(frozen=True)
    class Request(request.GenerationRequest):
        made_up_level: int = 3
    request.GenerationRequest = Request

    from bagel_ray.client import Client
    from bagel_ray.flags import add_request_flags
    from bagel_ray.jobs.inputs import ITEM_KEYS, Item, ItemError, JobInput, build_request
    from bagel_ray.serve.schemas import ImageGenerationRequest

    out = {}
    body = ImageGenerationRequest.model_validate({"prompt": "p", "made_up_level": 7})
    out["http"] = body.request("text2img", "p", None, 1).made_up_level
    try:
        ImageGenerationRequest.model_validate({"prompt": "p", "made_up_level": 10})
    except ValueError:
        out["http_refuses"] = True
    parser = argparse.ArgumentParser()
    add_request_flags(parser, "knobs")
    out["cli"] = parser.parse_args(["--level", "5"]).made_up_level
    job = JobInput("in.jsonl", "text2img", {})
    out["bulk_keys"] = "made_up_level" in ITEM_KEYS and "level" in ITEM_KEYS
    out["bulk"] = build_request(Item("x", 1, {"id": "x", "prompt": "p", "made_up_level": 6}), job).made_up_level
    try:
        build_request(Item("x", 1, {"id": "x", "prompt": "p", "level": 0}), job)
    except ItemError as exc:
        out["bulk_refuses"] = str(exc)

    import types
    class Handle:  # a Serve handle's shape; its answer's text is the request a replica would get
        class generate:
            @staticmethod
            def remote(req):
                return types.SimpleNamespace(result=lambda timeout_s: types.SimpleNamespace(text=req))

    out["client"] = Client(handle=Handle()).chat("hi", made_up_level=8).made_up_level
    print(json.dumps(out))
''')


def test_a_knob_added_to_the_table_alone_reaches_every_door():
    proc = subprocess.run([sys.executable, "-c", MADE_UP], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"http": 7, "http_refuses": True, "cli": 5, "bulk_keys": True, "bulk": 6,
                   "bulk_refuses": "made_up_level must be >= 1 and <= 9, got 0", "client": 8}
