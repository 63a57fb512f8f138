"""Reading a bulk job's input: ids, structural errors that stop the job before it starts,
chunks of the items still to do, and per-item requests whose problems fail only that item."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bagel_ray.engine.request import GenerationRequest
from bagel_ray.flags import UsageError
from bagel_ray.jobs import inputs
from bagel_ray.jobs.inputs import Item, ItemError, JobInput, build_request, read_chunk, scan


def jsonl(path: Path, *lines: object) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def all_items(job: JobInput, found) -> list[Item]:
    return [item for chunk in found.chunks for item in read_chunk(job, chunk)]


def test_txt_ids_are_line_numbers(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a red fox\n\n  a blue boat  \r\nlast without newline")
    found = scan(path, "text2img", {})
    assert (found.total, found.todo, found.modalities) == (3, 3, {"text2img": 3})
    items = all_items(JobInput(str(path), "text2img", {}), found)
    assert [(i.id, i.line, i.fields) for i in items] == [
        ("00000001", 1, {"prompt": "a red fox"}), ("00000003", 3, {"prompt": "a blue boat"}),
        ("00000004", 4, {"prompt": "last without newline"})]


def test_chunks_hold_only_items_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "CHUNK_ITEMS", 3)
    ids = [f"x{i}" for i in range(10)]
    path = jsonl(tmp_path / "in.jsonl", *({"id": i, "prompt": "p", "modality": "text2text"} for i in ids))
    done = {"x0": True, "x4": False, "x5": True}
    found = scan(path, "text2img", done)
    assert (found.total, found.ok, found.failed, found.todo) == (10, 2, 1, 7)
    assert found.modalities == {"text2text": 7}
    got = [[i.id for i in read_chunk(JobInput(str(path), "text2img", {}), c)] for c in found.chunks]
    assert got == [["x1", "x2", "x3"], ["x6", "x7", "x8"], ["x9"]]


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2 is not valid JSON"),
    ('["a list"]', "line 2 is not a JSON object"),
    ('{"prompt": "no id"}', "line 2: id must be"),
    ('{"id": "../escape", "prompt": "p"}', "line 2: id must be"),
    ('{"id": "a", "prompt": "again"}', "line 2: duplicate id 'a'"),
])
def test_structural_errors_stop_before_anything_runs(tmp_path, line, message):
    path = jsonl(tmp_path / "in.jsonl", {"id": "a", "prompt": "p"}, line)
    with pytest.raises(UsageError, match=message):
        scan(path, "text2img", {})


def test_empty_input_is_an_error(tmp_path):
    with pytest.raises(UsageError, match="has no items"):
        scan(jsonl(tmp_path / "in.jsonl", ""), "text2img", {})


def test_integer_ids_are_accepted(tmp_path):
    path = jsonl(tmp_path / "in.jsonl", {"id": 7, "prompt": "p"})
    found = scan(path, "text2img", {})
    assert [i.id for i in all_items(JobInput(str(path), "text2img", {}), found)] == ["7"]


# -- requests ---------------------------------------------------------------------------------


@pytest.fixture
def job(tmp_path) -> JobInput:
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "a.png")
    return JobInput(str(tmp_path / "in.jsonl"), "text2img", {"num_inference_steps": 9, "seed": 1})


def item(**fields) -> Item:
    return Item("x", 1, {"id": "x", **fields})


def test_item_fields_override_job_flags(job):
    req = build_request(item(prompt="p", seed=5, cfg_interval=[0.1, 0.9], think=True), job)
    assert req == GenerationRequest("text2img", "p", num_inference_steps=9, seed=5, cfg_interval=(0.1, 0.9), think=True)


def test_image_is_relative_to_the_input_file(job):
    req = build_request(item(prompt="p", modality="img2text", image="imgs/a.png"), job)
    assert req.image.size == (30, 20)


def test_job_image_applies_to_image_input_items_only(job, tmp_path):
    job = JobInput(job.path, "text2img", {}, image=str(tmp_path / "imgs" / "a.png"))
    assert build_request(item(prompt="p", modality="img2img"), job).image.size == (30, 20)
    assert build_request(item(prompt="p"), job).image is None


@pytest.mark.parametrize("fields, message", [
    ({"prompt": "p", "stepz": 3}, "unknown field stepz"),
    ({"prompt": "p", "steps": "many"}, 'num_inference_steps must be an integer, got "many"'),
    ({"prompt": "p", "steps": 2.5}, "num_inference_steps must be an integer"),
    ({"prompt": "p", "think": "yes"}, "think must be true or false"),
    ({"prompt": "p", "cfg_text_scale": True}, "cfg_text_scale must be a number"),
    ({"prompt": "p", "cfg_interval": [0.5]}, "cfg_interval must be a list of two numbers"),
    ({"prompt": "p", "cfg_renorm_type": 3}, "cfg_renorm_type must be a string"),
    ({"prompt": "p", "cfg_renorm_type": "bogus"}, "cfg_renorm_type must be one of"),
    ({"prompt": "p", "steps": 0}, "num_inference_steps must be >= 1 and <= 500, got 0"),
    ({"prompt": "p", "height": 30}, "height must be >= 16 and a multiple of 16, got 30"),
    # the HTTP API's types and ranges (issue 25 items 4 and 7)
    ({"prompt": "p", "seed": -1}, "seed must be >= 0 and <= 9223372036854775807, got -1"),
    ({"prompt": "p", "seed": 2**70}, "seed must be >= 0"),
    ({"prompt": "p", "num_inference_steps": 10**6}, "num_inference_steps must be >= 1 and <= 500"),
    ({"prompt": "p", "modality": "text2text", "max_tokens": 10**12}, "max_tokens must be >= 1 and <= 32768"),
    ({"prompt": "p", "num_inference_steps": True}, "num_inference_steps must be an integer, got true"),
    ({"prompt": "p", "num_inference_steps": "2"}, 'num_inference_steps must be an integer, got "2"'),
    ({"prompt": "p", "num_inference_steps": 2.0}, "num_inference_steps must be an integer, got 2.0"),
    ({"prompt": "p", "cfg_text_scale": float("nan")}, "cfg_text_scale must be a finite number"),
    ({"prompt": "p", "cfg_img_scale": -1}, "cfg_img_scale must be >= 0"),
    ({"prompt": "p", "temperature": -0.1}, "temperature must be >= 0"),
    ({"prompt": "p", "temperature": 0, "do_sample": True}, "do_sample needs a temperature > 0"),
    ({"prompt": "p", "cfg_interval": [0.9, 0.1]}, r"cfg_interval must be \[lo, hi\] with lo <= hi"),
    ({"prompt": "p", "taylorseer": 1}, "taylorseer must be true or false"),
    ({"prompt": "p", "steps": 3, "num_inference_steps": 4}, "steps and num_inference_steps are the same knob"),
    ({"prompt": "p", "modality": "text2video"}, "unknown modality 'text2video'"),
    ({"prompt": ""}, "prompt must be a non-empty string"),
    ({}, "prompt must be a non-empty string"),
    ({"prompt": "p", "modality": "img2img"}, "img2img needs an input image"),
    ({"prompt": "p", "modality": "img2img", "image": "imgs/missing.png"}, "cannot read image .*missing.png"),
    ({"prompt": "p", "image": "imgs/a.png"}, "text2img takes no input image"),
])
def test_bad_items_fail_with_a_reason(job, fields, message):
    with pytest.raises(ItemError, match=message):
        build_request(item(**fields), job)


def test_aliases_and_new_knobs_reach_the_request(job):
    req = build_request(item(prompt="p", steps=7, taylorseer=True, cfg_interval=[0, 1]), job)
    assert (req.num_inference_steps, req.taylorseer, req.cfg_interval) == (7, True, (0.0, 1.0))
    assert req.sampler().num_inference_steps == 7 and req.sampler().taylorseer is True


def test_a_bad_knob_fails_before_the_image_is_read(job, monkeypatch):
    opened = []
    monkeypatch.setattr(inputs, "read_image", lambda path: opened.append(path))
    with pytest.raises(ItemError, match="seed must be >= 0"):
        build_request(item(prompt="p", modality="img2text", image="imgs/a.png", seed=-1), job)
    assert opened == []


def test_failed_outcome_keeps_valid_modality_and_seed(job):
    outcome = inputs.failed_outcome(item(prompt="p", modality="img2img", seed=3), job, "boom")
    assert outcome.record == {"id": "x", "status": "failed", "error": "boom", "output": None, "modality": "img2img",
                              "seed": 3, "timings": {}}
    for seed in ("s", -1, 2**70, True):
        outcome = inputs.failed_outcome(item(prompt="p", modality=5, seed=seed), job, "boom")
        assert (outcome.record["modality"], outcome.record["seed"]) == (None, None)
