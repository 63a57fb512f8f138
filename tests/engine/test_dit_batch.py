"""Denoising jobs of different requests stepped together give each job the latents it gets
denoised alone, whatever joins, leaves or fails around it.

Tolerance: a GEMM's row results depend on how many rows it has (BLAS picks kernels and splits
work by shape), and a batch changes the row count. On the CI's CPU (MKL), with one thread, every
GEMM of four rows or more gives the same rows, so jobs whose every step runs at least two
blocks of a 2x2 grid or larger (two marker rows per block go through the und expert) come out
bit for bit equal there; another CPU's BLAS may split even those by row count (seen on a GPU
machine's host CPU with another torch build). Otherwise (a one-block step alone: CFG off or
outside its interval; several threads) they agree to about 1e-6. Both are checked to
rtol = atol = 1e-5 (a job that took another job's rows is off by ~1).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bagel_ray.engine.cancel import Cancelled
from bagel_ray.engine.dit import DenoiseJob, DiT
from bagel_ray.engine.dit_batch import BatchDenoiser
from bagel_ray.engine.kv_context import ImageContexts, KVContext
from bagel_ray.engine.request import GenerationRequest
from tests.determinism import TOL
from tests.engine.spies import spy_forwards


def square(size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(4).integers(0, 256, (size, size, 3), dtype=np.uint8))


REQUESTS = {
    # cfg_img equals gen (text2img without think): that branch is never run
    "fox": GenerationRequest("text2img", "a red fox", seed=1, num_inference_steps=6, height=64, width=64, cfg_img_scale=1.5),
    # CFG only inside (0.2, 0.9], channel renorm, its own number of steps
    "boat": GenerationRequest("text2img", "a boat on a lake", seed=2, num_inference_steps=9, height=64, width=64, cfg_text_scale=3.0,
                              cfg_interval=(0.2, 0.9), cfg_renorm_type="channel"),
    # an edit: cfg_img is a context of its own
    "edit": GenerationRequest("img2img", "make it night", image=square(), seed=3, num_inference_steps=5),
    # no CFG at all: one block a step
    "plain": GenerationRequest("text2img", "plain", seed=4, num_inference_steps=4, height=64, width=64, cfg_text_scale=1.0),
    # another latent grid: its own forward in the same step
    "wide": GenerationRequest("text2img", "a castle", seed=5, num_inference_steps=5, height=32, width=48, cfg_img_scale=1.5),
}


@pytest.fixture(scope="module")
def dit(pipeline) -> DiT:
    return pipeline.dit


@pytest.fixture(scope="module")
def prepared(pipeline) -> dict:
    return {name: pipeline.prepare_image(req) for name, req in REQUESTS.items()}


@pytest.fixture(scope="module")
def alone(dit, prepared) -> dict[str, torch.Tensor]:
    return {name: dit.denoise(prepared[name].contexts, REQUESTS[name].sampler(), prepared[name].noise) for name in REQUESTS}


def make_job(dit: DiT, prepared: dict, name: str, **kwargs) -> DenoiseJob:
    return dit.job(prepared[name].contexts, REQUESTS[name].sampler(), prepared[name].noise, key=name, **kwargs)


def run(batch: BatchDenoiser, rounds: int = 100) -> dict[str, DenoiseJob]:
    ended: dict[str, DenoiseJob] = {}
    for _ in range(rounds):
        if batch.idle:
            return ended
        ended.update((job.key, job) for job in batch.step())
    raise AssertionError("the batch did not drain")


def test_velocities_take_a_latent_block_and_time_per_context(dit, prepared):
    """Each row block with its own x and t equals its own forward."""
    g = torch.Generator().manual_seed(0)
    ctx = prepared["edit"].contexts
    names = ("cond", "cfg_text", "cfg_img")
    x = torch.randn(3, 16, 64, generator=g)
    t = torch.tensor([0.9, 0.5, 0.2])
    pos = dit.job(ctx, REQUESTS["edit"].sampler(), prepared["edit"].noise).pos_ids
    both = dit.velocities(x, t, [ctx.branch(b) for b in names], pos)
    for k, b in enumerate(names):
        torch.testing.assert_close(both[k], dit.velocities(x[k], t[k], [ctx.branch(b)], pos)[0], **TOL)


def test_jobs_stepped_together_match_each_alone(dit, prepared, alone, monkeypatch):
    forwards = spy_forwards(dit, monkeypatch)
    records: dict[str, list] = {name: [] for name in REQUESTS}
    jobs = [make_job(dit, prepared, name, on_step=records[name].append) for name in REQUESTS]
    while not all(job.done for job in jobs):
        dit.step(jobs)
    for job in jobs:
        assert job.error is None and job.index == job.total == REQUESTS[job.key].num_inference_steps - 1
        torch.testing.assert_close(job.x, alone[job.key], **TOL)
        assert [r.index for r in records[job.key]] == list(range(job.total))
    # step 0: fox 2 blocks (cfg_img skipped), boat 1 (outside its interval), edit 3, plain 1 in one
    # forward; wide (cfg_img skipped) 2 in a forward of its own
    assert forwards[:2] == [7, 2]
    assert sorted(records["fox"][0].velocities) == ["cfg_img", "cfg_text", "cond"]
    assert records["fox"][0].velocities["cfg_img"] is records["fox"][0].velocities["cond"]


def test_rounding_close_when_every_gemm_has_four_rows(dit, prepared, alone, worker_threads):
    """fox, edit and wide run two or three blocks at every step (see the module docstring)."""
    names = ("fox", "edit", "wide")
    solo = {n: dit.denoise(prepared[n].contexts, REQUESTS[n].sampler(), prepared[n].noise) for n in names}
    jobs = [make_job(dit, prepared, n) for n in names]
    while not all(job.done for job in jobs):
        dit.step(jobs)
    for job in jobs:
        torch.testing.assert_close(job.x, solo[job.key], **TOL, msg=job.key)


def test_jobs_join_mid_way_leave_when_done_and_sizes_take_turns(dit, prepared, alone, monkeypatch):
    batch = BatchDenoiser(dit, max_batch_size=2)
    steps: list[list[tuple[str, int]]] = []
    real = dit.step

    def step(jobs):
        steps.append([(job.key, job.index) for job in jobs])
        real(jobs)

    monkeypatch.setattr(dit, "step", step)
    ended: dict[str, DenoiseJob] = {}
    batch.submit(make_job(dit, prepared, "fox"))
    for _ in range(2):
        ended.update((job.key, job) for job in batch.step())
    batch.submit(make_job(dit, prepared, "boat"))  # joins at fox's step 2
    batch.submit(make_job(dit, prepared, "plain"))  # the batch is full: waits for a free place
    batch.submit(make_job(dit, prepared, "wide"))  # another size: waits for fox's size to drain
    batch.submit(make_job(dit, prepared, "edit"))  # fox's size, but queued behind wide
    ended.update(run(batch))
    assert steps[2] == [("fox", 2), ("boat", 0)]
    assert steps[4] == [("fox", 4), ("boat", 2)] and steps[5] == [("boat", 3), ("plain", 0)]  # fox done: plain joins
    wide = [i for i, s in enumerate(steps) if any(k == "wide" for k, _ in s)]
    assert [steps[i] for i in wide] == [[("wide", k)] for k in range(4)]  # alone: no other job of its size
    boat_or_plain = [i for i, s in enumerate(steps) if any(k in ("boat", "plain") for k, _ in s)]
    assert max(boat_or_plain) < wide[0]  # wide waited for the 64x64 batch to drain ...
    edit = [i for i, s in enumerate(steps) if any(k == "edit" for k, _ in s)]
    assert wide[-1] < edit[0]  # ... and edit, queued behind wide, for wide (it did not join plain)
    assert sorted(ended) == sorted(REQUESTS)
    for name, job in ended.items():
        assert job.error is None
        torch.testing.assert_close(job.x, alone[name], **TOL)


def test_cancelling_or_failing_one_job_leaves_the_others(dit, prepared, alone):
    stop = {"boat": False, "plain": False}

    def broken(record):
        if record.index == 2:
            raise RuntimeError("the progress consumer broke")

    batch = BatchDenoiser(dit, max_batch_size=3)
    batch.submit(make_job(dit, prepared, "fox"))
    batch.submit(make_job(dit, prepared, "boat", should_stop=lambda: stop["boat"]))
    batch.submit(make_job(dit, prepared, "edit", on_step=broken))
    batch.submit(make_job(dit, prepared, "plain", should_stop=lambda: stop["plain"]))  # waits: the batch is full
    for _ in range(2):
        assert batch.step() == []
    stop["boat"] = stop["plain"] = True
    ended = run(batch)
    assert isinstance(ended["boat"].error, Cancelled) and ended["boat"].index == 2
    assert "before step 3 of 8" in str(ended["boat"].error)
    assert isinstance(ended["plain"].error, Cancelled) and ended["plain"].index == 0  # never ran
    assert isinstance(ended["edit"].error, RuntimeError) and ended["edit"].index == 2
    assert ended["fox"].error is None
    torch.testing.assert_close(ended["fox"].x, alone["fox"], **TOL)


def test_a_failed_step_is_retried_with_half_the_batch(dit, prepared, alone, monkeypatch):
    """What the DiT replica does on CUDA out-of-memory: halve the batch until it fits; a job
    that does not fit alone fails, the others finish with their own latents."""
    huge = prepared["edit"].contexts.gen
    real = dit.velocities

    def velocities(x, t, contexts, *args, **kwargs):
        if len(contexts) > 4 or any(c is huge for c in contexts):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return real(x, t, contexts, *args, **kwargs)

    monkeypatch.setattr(dit, "velocities", velocities)
    batch = BatchDenoiser(dit, max_batch_size=4)
    for name in ("fox", "edit", "boat", "plain"):
        batch.submit(make_job(dit, prepared, name))
    ended: dict[str, DenoiseJob] = {}
    sizes = []
    for _ in range(100):
        if batch.idle:
            break
        try:
            done = batch.step()
        except torch.cuda.OutOfMemoryError as exc:
            sizes.append(len(batch.running))
            done = batch.back_off(exc)
        ended.update((job.key, job) for job in done)
    # fox, edit, boat, plain: 7 blocks, too many; fox and edit: edit cannot fit; fox alone runs
    # to its end; then edit, boat and plain (5 blocks), and edit alone, which fails
    assert sizes == [4, 2, 3, 1]
    assert isinstance(ended["edit"].error, torch.cuda.OutOfMemoryError) and ended["edit"].index == 0
    for name in ("fox", "boat", "plain"):
        assert ended[name].error is None
        torch.testing.assert_close(ended[name].x, alone[name], **TOL)


def test_denoise_is_the_one_job_case(dit, prepared):
    ctx, params, noise = prepared["fox"].contexts, REQUESTS["fox"].sampler(), prepared["fox"].noise
    seen = []
    with pytest.raises(Cancelled, match="before step 3 of 5"):
        dit.denoise(ctx, params, noise, seen.append, should_stop=lambda: len(seen) == 2)
    with pytest.raises(ValueError, match="noise has shape"):
        dit.job(ctx, params, noise[:-1])


CACHED = {
    # the notebook's t2i settings with the step cache: cfg_text's count lags cond's after its interval
    "cached": GenerationRequest("text2img", "a red fox", seed=1, num_inference_steps=14, height=64, width=64, taylorseer=True),
    # an edit with the cache: three branches of their own
    "cached_edit": GenerationRequest("img2img", "make it night", image=square(), seed=3, num_inference_steps=12, taylorseer=True),
    # the exact path beside them
    "exact": GenerationRequest("text2img", "a boat on a lake", seed=2, num_inference_steps=12, height=64, width=64),
}


def test_taylorseer_and_exact_jobs_stepped_together_match_each_alone(dit, pipeline, monkeypatch):
    """Jobs with and without the step cache in one batch, the edit joining two steps late (its
    full forwards then fall on other steps than the t2i's): each gets the latents it gets
    alone; a step's forward holds only the blocks on full forwards."""
    prep = {name: pipeline.prepare_image(req) for name, req in CACHED.items()}
    alone = {n: dit.denoise(prep[n].contexts, r.sampler(), prep[n].noise) for n, r in CACHED.items()}
    records: dict[str, list] = {name: [] for name in CACHED}

    def job(name: str) -> DenoiseJob:
        return dit.job(prep[name].contexts, CACHED[name].sampler(), prep[name].noise, records[name].append, key=name)

    forwards = spy_forwards(dit, monkeypatch)
    jobs = [job("cached"), job("exact")]
    for _ in range(2):
        dit.step(jobs)
    jobs.append(job("cached_edit"))
    while not all(j.done for j in jobs):
        dit.step(jobs)
    for j in jobs:
        assert j.error is None and j.index == j.total
        torch.testing.assert_close(j.x, alone[j.key], **TOL, msg=j.key)
    # the blocks that ran are the branches each record says came from a forward
    ran = [len(r.forwards) for rs in records.values() for r in rs]
    assert sum(forwards) == sum(ran)
    edit = records["cached_edit"]
    # step 5 of the edit (Taylor) is step 7 of the t2i (full): they share no forward that step
    assert edit[5].forwards == () and records["cached"][7].forwards == ("cond", "cfg_text")
    assert [len(r.forwards) for r in edit] == [3] * 5 + [0, 0, 3, 0, 0, 3]
    assert all(len(r.forwards) == len(r.velocities) for r in records["exact"])


def test_a_cfg_img_equal_to_gen_follows_cond_only_in_lockstep(dit, pipeline):
    """text2img with cfg_img > 1 and no think: cfg_img's context is gen's. With the cache it
    reuses cond's velocity while it has run at every step (then its cache is cond's), and
    runs on its own cache when CFG starts later (its count lags); either way it equals a run
    where cfg_img is a copy of the context that is never reused, as the official code runs it."""
    for interval in ((0.4, 1.0), (0.0, 0.8)):
        req = GenerationRequest("text2img", "a red fox", seed=6, num_inference_steps=14, height=64, width=64, cfg_img_scale=1.5,
                                cfg_interval=interval, taylorseer=True)
        prep = pipeline.prepare_image(req)
        ctx = prep.contexts
        copied = ImageContexts(ctx.gen, ctx.cfg_text, KVContext(ctx.gen.kv.clone(), ctx.gen.rope), ctx.height, ctx.width)
        shared_records, own_records = [], []
        shared = dit.denoise(ctx, req.sampler(), prep.noise, shared_records.append)
        own = dit.denoise(copied, req.sampler(), prep.noise, own_records.append)
        torch.testing.assert_close(shared, own, **TOL)
        assert any("cfg_img" in r.forwards for r in own_records)
        lockstep = interval[1] == 1.0
        assert any("cfg_img" in r.forwards for r in shared_records) != lockstep
