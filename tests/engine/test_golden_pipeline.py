"""Parity with the official implementation on the golden tiny checkpoint.

The golden model folder is loaded with the same loader as the real checkpoint (float32 on
the CPU, as the fixtures were made) and every case is reproduced: token ids exactly, logits,
KV caches, per-step velocities, latents and decoded images within the manifest tolerances.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from bagel_ray.engine.context import GEN_THINK_SYSTEM_PROMPT
from bagel_ray.engine.pipeline import LocalPipeline
from bagel_ray.engine.request import GenerationRequest
from bagel_ray.engine.decoder import DecodeParams
from bagel_ray.model.image_transforms import decoded_to_uint8
from tests.golden import assert_matches, load_case_tensors

IMAGE_CASES = ("text2img", "text2img_app", "text2img_variant", "text2img_think", "img2img", "text2img_taylorseer",
               "img2img_taylorseer")


@pytest.fixture(scope="module")
def pipeline(golden_model_dir) -> LocalPipeline:
    return LocalPipeline.from_pretrained(golden_model_dir, device="cpu", dtype="float32")


def check(case: dict, name: str, actual, tensors: dict) -> None:
    spec = case["tensors"].get(name) or case["kv_tensors"][name]
    assert_matches(f"{case['kind']}:{name}", actual, tensors[name], spec["compare"])


def check_kv(case: dict, prefix: str, kv: torch.Tensor, tensors: dict) -> None:
    for layer in range(kv.shape[0]):
        check(case, f"{prefix}.layer{layer}.key", kv[layer, 0], tensors)
        check(case, f"{prefix}.layer{layer}.value", kv[layer, 1], tensors)


def input_image(golden_dir) -> Image.Image:
    return Image.open(golden_dir / "cases" / "input_image.png")


@pytest.mark.parametrize("name", ["text2text", "img2text"])
def test_understanding(pipeline, manifest, golden_dir, name):
    case = manifest["cases"][name]
    tensors = load_case_tensors(golden_dir, case)
    th = pipeline.thinker
    ctx = th.empty()
    if name == "img2text":
        resized = pipeline.vae_resized(input_image(golden_dir))
        check(case, "preprocess.vae_resized_uint8", torch.from_numpy(np.asarray(resized).copy()), tensors)
        block = th.builder.vit_block(resized)
        check(case, "vit.packed_pixel_patches", block.patches, tensors)
        check(case, "vit.position_ids", block.position_ids, tensors)
        check(case, "vit.encoder_out", block.features, tensors)
        check(case, "vit.connector_out", block.rows - pipeline.thinker.model.vit_pos_embed(block.position_ids), tensors)
        ctx = th.append_vit(ctx, resized)
    ctx = th.append_text(ctx, case["prompt"])
    assert (ctx.length, ctx.rope) == (case["results"]["prefill_context"]["kv_lens"][0], case["results"]["prefill_context"]["ropes"][0])
    check_kv(case, "prefill_kv", ctx.kv, tensors)
    out = th.decode([ctx], DecodeParams(max_new_tokens=case["max_length"] - 1), keep_logits=True)[0]
    check(case, "generated_ids", torch.tensor(out.token_ids), tensors)
    check(case, "logits", out.logits, tensors)
    check(case, "first_logits", out.logits[0], tensors)
    assert out.text == case["results"]["output_text"]


def test_understanding_request_matches(pipeline, manifest, golden_dir):
    """The same cases through the request API (the VAE resize before the ViT is applied)."""
    for name in ("text2text", "img2text"):
        case = manifest["cases"][name]
        image = input_image(golden_dir) if name == "img2text" else None
        res = pipeline.run(GenerationRequest(name, case["prompt"], image=image, max_tokens=case["max_length"] - 1))
        assert res.token_ids == case["results"]["generated_ids"]
        assert res.text == case["results"]["output_text"]


def test_img2text_chat_path(pipeline, manifest, golden_dir):
    """`Bagel.chat` (the VLM eval path) feeds the raw image to the ViT resize only."""
    case = manifest["cases"]["img2text_chat"]
    tensors = load_case_tensors(golden_dir, case)
    th = pipeline.thinker
    block = th.builder.vit_block(input_image(golden_dir))
    check(case, "vit.packed_pixel_patches", block.patches, tensors)
    check(case, "vit.encoder_out", block.features, tensors)
    ctx = th.append_text(th.append_vit(th.empty(), input_image(golden_dir)), case["prompt"])
    out = th.decode([ctx], DecodeParams(max_new_tokens=case["max_length"] - 1), keep_logits=True)[0]
    check(case, "generated_ids", torch.tensor(out.token_ids), tensors)
    check(case, "logits", out.logits, tensors)


def test_think_decode(pipeline, manifest, golden_dir):
    case = manifest["cases"]["text2img_think"]
    tensors = load_case_tensors(golden_dir, case)
    th = pipeline.thinker
    ctx = th.append_text(th.append_text(th.empty(), GEN_THINK_SYSTEM_PROMPT), case["prompt"])
    check_kv(case, "think_prefill_kv", ctx.kv, tensors)
    out = th.decode([ctx], DecodeParams(max_new_tokens=case["max_think_token_n"] - 1), keep_logits=True)[0]
    check(case, "think_generated_ids", torch.tensor(out.token_ids), tensors)
    check(case, "think_logits", out.logits, tensors)
    assert out.text == case["results"]["think_text"]


def image_request(case: dict, golden_dir, tensors: dict | None) -> GenerationRequest:
    hyper = case["hyper"]
    kwargs = {}
    if case["kind"] == "img2img":
        kwargs["image"] = input_image(golden_dir)
    else:
        kwargs["height"], kwargs["width"] = case["image_shape"]
    return GenerationRequest(
        "img2img" if case["kind"] == "img2img" else "text2img",
        case["prompt"],
        seed=case["seed"],
        num_inference_steps=case["num_timesteps"],
        cfg_text_scale=hyper["cfg_text_scale"],
        cfg_img_scale=hyper["cfg_img_scale"],
        cfg_interval=tuple(hyper["cfg_interval"]),
        cfg_renorm_type=hyper["cfg_renorm_type"],
        cfg_renorm_min=hyper["cfg_renorm_min"],
        timestep_shift=hyper["timestep_shift"],
        taylorseer=hyper.get("enable_taylorseer", False),
        think=case["kind"] == "text2img_think",
        max_think_tokens=case.get("max_think_token_n", 2) - 1,
        init_noise=None if tensors is None else tensors["init_noise"],
        **kwargs,
    )


@pytest.mark.parametrize("name", IMAGE_CASES)
@pytest.mark.parametrize("noise_from", ["injected", "seed"])
def test_image_generation(pipeline, manifest, golden_dir, name, noise_from):
    case = manifest["cases"][name]
    tensors = load_case_tensors(golden_dir, case)
    req = image_request(case, golden_dir, tensors if noise_from == "injected" else None)
    prepared = pipeline.prepare_image(req)
    check(case, "init_noise", prepared.noise, tensors)
    if noise_from == "seed":  # as the DiT makes it, from the seed, over contexts the Thinker built
        check(case, "init_noise", pipeline.initial_noise(req, prepared.contexts), tensors)
    ctx = prepared.contexts
    for branch, key in (("cond", "gen"), ("cfg_text", "cfg_text"), ("cfg_img", "cfg_img")):
        kv = ctx.branch(branch)
        want = case["results"]["contexts"][key]
        assert (kv.length, kv.rope) == (want["kv_lens"][0], want["ropes"][0]), branch
        if kv.length:
            check_kv(case, f"kv.{key}", kv.kv, tensors)
    if name == "text2img_think":
        assert prepared.think_token_ids == case["results"]["think_generated_ids"]
        assert prepared.think_text == case["results"]["think_text"]
    assert (ctx.height, ctx.width) == tuple(case["results"]["image_shape_hw"])

    records = []
    result = pipeline.render(req, prepared, records.append)
    steps = case["results"]["steps"]
    assert len(records) == len(steps)
    check(case, "timesteps", torch.tensor([r.t for r in records]), tensors)
    check(case, "x_t", torch.stack([r.x for r in records]), tensors)
    check(case, "v_cond", torch.stack([r.velocities["cond"] for r in records]), tensors)
    check(case, "v_guided", torch.stack([r.guided for r in records]), tensors)
    check(case, "velocity_step0", records[0].guided, tensors)
    for i, (rec, step) in enumerate(zip(records, steps)):
        assert sorted(rec.velocities) == sorted(step["branches"]), f"step {i} branches"
        for branch in step["branches"]:
            key = f"step{i}.v_{branch}"
            if key in case["tensors"]:
                check(case, key, rec.velocities[branch], tensors)
    check(case, "final_latent_packed", result.latent_tokens, tensors)
    decoded, image = pipeline.dit.decode_image(result.latent_tokens, ctx.height, ctx.width)
    check(case, "decoded_raw", decoded, tensors)
    check(case, "image_uint8", decoded_to_uint8(decoded), tensors)
    assert image.size == (ctx.width, ctx.height)


@pytest.mark.parametrize("name", ["text2img_taylorseer", "img2img_taylorseer"])
def test_taylorseer_runs_the_network_on_the_official_full_forwards(pipeline, manifest, golden_dir, name):
    """Through `LocalPipeline.run`: each branch runs the network on forwards 0-4 of its own
    count and then every third (n % 3 == 1), the cfg branches counting only the steps inside
    the CFG interval; the final latents match the official ones, and the exact path from the
    same noise does not (so the parity above checks the cache, not the exact sampler)."""
    case = manifest["cases"][name]
    tensors = load_case_tensors(golden_dir, case)
    req = image_request(case, golden_dir, tensors)
    records = []
    result = pipeline.run(req, records.append)
    counts: dict[str, int] = {}
    for i, (rec, step) in enumerate(zip(records, case["results"]["steps"])):
        for branch in step["branches"]:
            n = counts.get(branch, 0)
            assert (branch in rec.forwards) == (n < 5 or n % 3 == 1), f"step {i} {branch} (its forward {n})"
            counts[branch] = n + 1
    assert sum(len(r.forwards) for r in records) < sum(len(s["branches"]) for s in case["results"]["steps"])
    check(case, "final_latent_packed", result.latent_tokens, tensors)
    exact = pipeline.run(replace(req, taylorseer=False))
    with pytest.raises(AssertionError, match="max abs diff"):
        check(case, "final_latent_packed", exact.latent_tokens, tensors)


def test_cached_and_exact_cases_stepped_together_match_the_official_ones(pipeline, manifest, golden_dir):
    """The engine's cross-request step (`DiT.step`) over four golden cases at once, two with
    the step cache and two without, two of each latent grid: every one still matches its
    official latents and velocities (each job keeps its own cache)."""
    names = ("text2img", "text2img_taylorseer", "img2img", "img2img_taylorseer")
    dit = pipeline.dit
    jobs, records = [], {name: [] for name in names}
    for name in names:
        case = manifest["cases"][name]
        tensors = load_case_tensors(golden_dir, case)
        req = image_request(case, golden_dir, tensors)
        prepared = pipeline.prepare_image(req)
        jobs.append(dit.job(prepared.contexts, req.sampler(), prepared.noise, records[name].append, key=(case, tensors)))
    while not all(job.done for job in jobs):
        dit.step(jobs)
    assert {r.batch for rs in records.values() for r in rs[:3]} == {2}  # each forward held both jobs of a grid
    for job, name in zip(jobs, names):
        case, tensors = job.key
        assert job.error is None
        check(case, "v_cond", torch.stack([r.velocities["cond"] for r in records[name]]), tensors)
        check(case, "final_latent_packed", job.x, tensors)
