"""The Ray Data stages of a standalone bulk job, called in this process on the tiny model (the
Ray Data plumbing around them is covered by `test_bulk_job.py`): the DiT stage denoises the
image rows of its batch together, each output equals `LocalPipeline.run`'s for the same
request, and a row that fails (in its preparation, its job's checks or its denoising) fails
alone.

How equal (tests/determinism.py): a batch of one is the request alone, in this process at the
same thread count, so bit for bit. Rows denoised in a batch with others run products of more
rows, which CPUs sum in another order or not (this machine's MKL at one thread gives the same
rows when every step runs CFG, as here, `cfg_interval` [0, 1]; an AVX-512 Xeon's does not):
their images are within `PIXEL_TOL` of their images alone.
"""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from bagel_ray.engine.request import GenerationRequest
from bagel_ray.jobs.data_runner import (
    DiTStage,
    EngineSpec,
    Row,
    ThinkerStage,
    rows_of,
    table_of,
)
from bagel_ray.jobs.store import Outcome
from bagel_ray.model.tiny import tiny_model_path
from tests.determinism import assert_pixels_close
from tests.engine.spies import spy_forwards
from tests.jobs.reference import reference_pipeline

EVERY_STEP = {"cfg_interval": (0.0, 1.0), "num_inference_steps": 4}
PICTURE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
REQUESTS = {
    "fox": GenerationRequest("text2img", "a red fox", seed=1, height=32, width=32, **EVERY_STEP),
    "boat": GenerationRequest("text2img", "a boat on a lake", seed=2, height=32, width=32, cfg_text_scale=3.0,
                              cfg_renorm_type="channel", **EVERY_STEP),
    "castle": GenerationRequest("text2img", "a castle", seed=3, height=32, width=32, cfg_img_scale=1.5, **EVERY_STEP),
    "longer": GenerationRequest("text2img", "a long road", seed=4, height=32, width=32, cfg_interval=(0.0, 1.0), num_inference_steps=6),
    "wide": GenerationRequest("text2img", "a wide field", seed=5, height=32, width=48, **EVERY_STEP),
    "edit": GenerationRequest("img2img", "make it night", image=PICTURE, seed=6, **EVERY_STEP),
    "answer": GenerationRequest("text2text", "Tell me a fact.", max_tokens=4, seed=7),
}
TIMINGS = {"text2img": {"prefill_s", "handoff_bytes", "handoff_send_s", "handoff_receive_s", "denoise_s", "vae_decode_s"},
           "img2img": {"prefill_s", "denoise_s", "vae_decode_s"}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_path(tmp_path_factory.mktemp("stages-cache"))


@pytest.fixture(scope="module")
def stages(model_dir):
    engine = EngineSpec(str(model_dir), "cpu", "float32")
    return ThinkerStage(engine), DiTStage(engine)


@pytest.fixture(scope="module")
def local(model_dir):
    with reference_pipeline(model_dir) as pipeline:
        yield pipeline


def run_stages(stages, requests: dict[str, GenerationRequest]) -> dict[str, Outcome]:
    """One batch of rows through the Thinker stage, then the DiT stage: each row's outcome."""
    thinker, dit = stages
    table = table_of([Row(name, req.modality, request=pickle.dumps(req)) for name, req in requests.items()])
    rows = rows_of(dit(thinker(table)))
    assert all(not r.pending for r in rows)
    return {r.id: Outcome.from_row({"record": r.record, "data": r.data}) for r in rows}


def image_of(outcome: Outcome, want) -> np.ndarray:
    """The outcome's pixels, once its record is checked against the reference's result."""
    assert outcome.ok, outcome.record
    assert outcome.record.get("think_text") == want.think_text
    with Image.open(io.BytesIO(outcome.data)) as png:
        return np.asarray(png.convert("RGB"))


def test_images_of_a_batch_denoise_together_and_match_local(stages, local, worker_threads, monkeypatch):
    forwards = spy_forwards(stages[1].pipeline.dit, monkeypatch)
    outcomes = run_stages(stages, REQUESTS)
    assert sorted(outcomes) == sorted(REQUESTS)
    for name, req in REQUESTS.items():
        want = local.run(req)
        if req.outputs_image:
            assert_pixels_close(image_of(outcomes[name], want), want.image, name)  # batched: see the docstring
            assert set(outcomes[name].record["timings"]) == TIMINGS[req.modality], name
        else:
            assert outcomes[name].ok and outcomes[name].data.decode() == want.text
    # `steps` timesteps are steps - 1 Euler steps. The four 32x32 text2img jobs share every
    # forward while they run (two blocks each: cond and cfg_text), then the longer one goes on
    # alone; the 32x48 one (two blocks) and the edit (three) have grids of their own.
    assert forwards == [8] * 3 + [2] * 2 + [2] * 3 + [3] * 3


def test_a_batch_of_one_is_as_before(stages, local, worker_threads):
    for name in ("fox", "edit"):
        outcome = run_stages(stages, {name: REQUESTS[name]})[name]
        want = local.run(REQUESTS[name])
        assert np.array_equal(image_of(outcome, want), np.asarray(want.image)), name  # alone: same shapes
        assert set(outcome.record["timings"]) == TIMINGS[REQUESTS[name].modality]


def test_a_row_that_fails_fails_alone(stages, local, worker_threads, monkeypatch):
    """Noise of the wrong size fails its job's checks (text2img: the handoff's noise; img2img:
    contexts built on the DiT); a job whose forward raises ends up alone and fails, and the
    others of its batch finish with the images they get alone."""
    poison = 7.0
    bad = {
        "bad-noise": GenerationRequest("text2img", "x", seed=8, height=32, width=32, init_noise=torch.zeros(3, 64), **EVERY_STEP),
        "bad-edit": GenerationRequest("img2img", "x", image=PICTURE, seed=9, init_noise=torch.zeros(3, 64), **EVERY_STEP),
        "bad-step": GenerationRequest("text2img", "x", seed=10, height=32, width=32,
                                      init_noise=torch.full((4, 64), poison), **EVERY_STEP),
        "bad-handoff": GenerationRequest("text2img", "x", seed=11, height=32, width=32, **EVERY_STEP),
    }
    good = {name: REQUESTS[name] for name in ("fox", "boat", "castle", "edit")}
    dit = stages[1].pipeline.dit
    real = dit.velocities

    def velocities(x, t, contexts, *args, **kwargs):  # the poisoned latents make a step raise
        if (x == poison).flatten(1).all(1).any():
            raise RuntimeError("a faulty step")
        return real(x, t, contexts, *args, **kwargs)

    monkeypatch.setattr(dit, "velocities", velocities)
    thinker, dit_stage = stages
    requests = {**good, **bad}
    table = table_of([Row(name, req.modality, request=pickle.dumps(req)) for name, req in requests.items()])
    rows = rows_of(thinker(table))
    for row in rows:
        if row.id == "bad-handoff":
            row.handoff = b"not a pickle"
    outcomes = {r.id: Outcome.from_row({"record": r.record, "data": r.data}) for r in rows_of(dit_stage(table_of(rows)))}

    for name, req in good.items():  # denoised beside each other: see the docstring
        want = local.run(req)
        assert_pixels_close(image_of(outcomes[name], want), want.image, name)
    errors = {name: outcomes[name].record["error"] for name in bad}
    assert all(not outcomes[name].ok and outcomes[name].data is None for name in bad), errors
    assert errors["bad-noise"].startswith("ValueError: noise has shape (3, 64)")
    assert errors["bad-edit"].startswith("ValueError: noise has shape (3, 64)")
    assert errors["bad-step"] == "RuntimeError: a faulty step"
    assert errors["bad-handoff"].startswith("UnpicklingError")
    assert all(outcomes[name].record["seed"] == req.seed for name, req in bad.items())
