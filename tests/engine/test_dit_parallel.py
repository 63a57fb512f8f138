"""One request denoised over several ranks of a gloo process group (CFG parallel, Ulysses
sequence parallel, both) gives the one-process latents and images, and golden parity; so does
each job of a batch of requests stepped together over the ranks (cross-request batching).

The ranks are real processes (`torch.multiprocessing` spawn) joined in a gloo group on the
CPU. Each loads the golden tiny checkpoint in float32 with one intra-op thread, builds the
request's contexts itself (the same on every rank) and keeps only its branches'. The tiny
model has 4 query and 2 KV heads, so sequence degrees 1 and 2 apply. Rows of a GEMM or an
attention split differently than in one process, so the latents agree with the one-process
path within the golden float32 tolerances, not bit for bit.
"""

from __future__ import annotations

import datetime
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from bagel_ray.engine.cancel import Cancelled
from bagel_ray.engine.dit import DenoiseParams
from bagel_ray.engine.dit_parallel import BranchPlan, ParallelConfig, latent_shares, row_split
from bagel_ray.engine.kv_context import Cut, ImageContexts, KVContext
from bagel_ray.model.image_transforms import decoded_to_uint8
from tests.engine.test_golden_pipeline import check, image_request
from tests.golden import load_case_tensors

# (world size, [(cfg, sequence, golden case), ...]): every degree and layout of the issue, and
# TaylorSeer over CFG parallel (text2img's cond-only steps too, one of them a full forward),
# sequence parallel and both. The first run of a world is also delivered over the group, and so
# is its last where that is a TaylorSeer one.
RUNS = {
    2: [(2, 1, "text2img"), (2, 1, "img2img"), (2, 1, "text2img_variant"), (1, 2, "text2img"), (1, 2, "img2img"),
        (1, 2, "img2img_taylorseer"), (2, 1, "text2img_taylorseer")],
    3: [(3, 1, "img2img"), (3, 1, "text2img_think")],
    4: [(2, 2, "text2img"), (2, 2, "img2img"), (2, 2, "img2img_taylorseer")],
}


def delivered_runs(runs: list) -> list:
    return [runs[0]] + ([runs[-1]] if runs[-1][2].endswith("_taylorseer") else [])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_golden(rank: int, world: int, port: int, golden_dir: str):
    """A spawned rank's start: one torch thread, the gloo group, and the golden checkpoint's
    pipeline with its manifest."""
    import json

    from bagel_ray.engine.pipeline import LocalPipeline

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    golden = Path(golden_dir)
    manifest = json.loads((golden / "manifest.json").read_text())
    return golden, manifest, LocalPipeline.from_pretrained(golden / "model", device="cpu", dtype="float32")


def _rank_main(rank: int, world: int, port: int, runs: list, golden_dir: str, out: str) -> None:
    """One rank: each run's final latents (every rank), its step records and image (rank 0);
    then a cancelled run and a failing callback on the first grid."""
    from bagel_ray.engine.dit_parallel import ParallelDiT

    golden, manifest, pipeline = _join_golden(rank, world, port, golden_dir)
    results = {}
    grids = {}
    for cfg, seq, name in runs:
        if (cfg, seq) not in grids:
            grids[cfg, seq] = ParallelDiT(pipeline.dit, ParallelConfig(cfg, seq))
        case = manifest["cases"][name]
        req = image_request(case, golden, load_case_tensors(golden, case))
        prepared = pipeline.prepare_image(req)
        records = []
        latents = grids[cfg, seq].denoise_contexts(prepared.contexts, req.sampler(), prepared.noise, records.append)
        entry = {"latents": latents}
        if rank == 0:
            ctx = prepared.contexts
            entry["decoded"] = pipeline.dit.decode_image(latents, ctx.height, ctx.width)[0]
            entry["records"] = [(r.t, r.x, r.velocities, r.guided, r.forwards) for r in records]
        results[cfg, seq, name] = entry
    # runs again with the contexts on rank 0 only: the others get theirs over the group
    for key in delivered_runs(runs):
        cfg, seq, name = key
        case = manifest["cases"][name]
        req = image_request(case, golden, load_case_tensors(golden, case))
        engine = grids[cfg, seq]
        sent = [None]
        if rank == 0:
            prepared = pipeline.prepare_image(req)
            plan = BranchPlan.of(prepared.contexts, req.sampler(), cfg)
            ctx = prepared.contexts
            sent = [(plan, engine.context_layout(plan, ctx), ctx.height, ctx.width, prepared.noise)]
        dist.broadcast_object_list(sent, src=0)
        plan, layout, height, width, noise = sent[0]
        # on 3 and 4 ranks the odd ones hold their share already (as a rank that fetched it from
        # the handoff itself): rank 0 sends only the others theirs
        own = engine.share(plan, pipeline.prepare_image(req).contexts) if rank % 2 and world > 2 else None
        held = engine.holding(rank == 0 or own is not None)
        assert held == [r == 0 or bool(r % 2 and world > 2) for r in range(world)]
        if rank == 0:
            relayed = engine.send_contexts(plan, prepared.contexts, [r for r, h in enumerate(held) if not h])
            assert relayed == sum(c.nbytes for r in range(world) if not held[r]
                                  for c in engine.share(plan, prepared.contexts, r).values())
            branches = plan.share(prepared.contexts, 0)
        else:
            branches = own if own is not None else engine.receive_contexts(plan, layout)
            helps = engine.helps(plan) and engine.c > 0  # then it also gets its KV heads of cond
            assert set(branches) == set(plan.branches_of(engine.c)) | ({"cond"} if helps else set())
            if helps:
                assert branches["cond"].kv.shape[3] == pipeline.cfg.llm.num_key_value_heads // world
        results["delivered", key] = engine.denoise(plan, branches, height, width, req.sampler(), noise)
        # the same stepped by hand: how many steps ran cond over every rank (`help_cond`)
        job = engine.job(plan, branches, height, width, req.sampler(), noise)
        while not job.done:
            engine.step([job])
        assert torch.equal(job.x, results["delivered", key])
        results["helped", key] = (job.helped, engine.can_help)
    cfg, seq, name = runs[0]
    case = manifest["cases"][name]
    req = image_request(case, golden, load_case_tensors(golden, case))
    # cancellation (rank 0's should_stop) and a failing callback on rank 0 end every rank alike
    prepared = pipeline.prepare_image(req)
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > 2

    def fail(record) -> None:
        if record.index == 1:
            raise RuntimeError("client went away")

    outcomes = []
    for kwargs in ({"should_stop": stop}, {"on_step": fail}):
        try:
            grids[cfg, seq].denoise_contexts(prepared.contexts, req.sampler(), prepared.noise, **kwargs)
            outcomes.append("finished")
        except Cancelled as exc:
            outcomes.append(f"cancelled: {exc}")
        except RuntimeError as exc:
            outcomes.append(f"raised: {exc}")
    results["outcomes"] = outcomes
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def golden_pipeline(golden_model_dir):
    from bagel_ray.engine.pipeline import LocalPipeline

    return LocalPipeline.from_pretrained(golden_model_dir, device="cpu", dtype="float32")


def one_process(pipeline, manifest, golden_dir, name: str) -> tuple[torch.Tensor, list]:
    case = manifest["cases"][name]
    req = image_request(case, golden_dir, load_case_tensors(golden_dir, case))
    prepared = pipeline.prepare_image(req)
    records = []
    latents = pipeline.dit.denoise(prepared.contexts, req.sampler(), prepared.noise, records.append)
    return latents, records


@pytest.mark.parametrize("world", sorted(RUNS))
def test_parallel_denoise_matches_one_process_and_golden(world, golden_dir, manifest, golden_pipeline, tmp_path, worker_threads):
    runs = RUNS[world]
    torch.multiprocessing.spawn(_rank_main, args=(world, free_port(), runs, str(golden_dir), str(tmp_path)), nprocs=world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for cfg, seq, name in runs:
        case = manifest["cases"][name]
        tensors = load_case_tensors(golden_dir, case)
        tol = case["tensors"]["final_latent_packed"]["compare"]
        latents = ranks[0][cfg, seq, name]["latents"]
        for r in range(1, world):  # every rank took the same steps on the same numbers
            assert torch.equal(ranks[r][cfg, seq, name]["latents"], latents), (cfg, seq, name, r)
        alone, alone_records = one_process(golden_pipeline, manifest, golden_dir, name)
        torch.testing.assert_close(latents, alone, atol=tol["atol"], rtol=tol["rtol"], msg=f"{cfg}x{seq} {name}")
        records = ranks[0][cfg, seq, name]["records"]
        assert len(records) == len(alone_records) == len(case["results"]["steps"])
        for i, ((t, x, v, guided, forwards), mine, step) in enumerate(zip(records, alone_records, case["results"]["steps"])):
            assert t == mine.t
            assert sorted(v) == sorted(mine.velocities) == sorted(step["branches"]), f"step {i} branches"
            assert forwards == mine.forwards, f"step {i}: the same full forwards as in one process"
        if name.endswith("_taylorseer"):  # the cache was used: fewer forwards than branch steps
            assert sum(len(r[4]) for r in records) < sum(len(step["branches"]) for step in case["results"]["steps"])
        # golden parity through the parallel path
        check(case, "x_t", torch.stack([r[1] for r in records]), tensors)
        check(case, "v_cond", torch.stack([r[2]["cond"] for r in records]), tensors)
        check(case, "v_guided", torch.stack([r[3] for r in records]), tensors)
        check(case, "final_latent_packed", latents, tensors)
        decoded = ranks[0][cfg, seq, name]["decoded"]
        check(case, "decoded_raw", decoded, tensors)
        check(case, "image_uint8", decoded_to_uint8(decoded), tensors)
        ctx_h, ctx_w = case["results"]["image_shape_hw"]
        alone_decoded = golden_pipeline.dit.decode_image(alone, ctx_h, ctx_w)[0]
        torch.testing.assert_close(decoded, alone_decoded, atol=tol["atol"], rtol=tol["rtol"])
    # contexts sent over the group from rank 0 are the ones each rank built itself
    for key in delivered_runs(runs):
        for r in range(world):
            assert torch.equal(ranks[r]["delivered", key], ranks[r][key]["latents"]), (key, r)
        # cond-only steps (outside cfg_interval) ran on every rank where the heads divide by
        # the ranks (2 here: the tiny model's 4 / 2 heads), and on cond's ranks alone otherwise
        # and for a TaylorSeer request (its cache keeps cond's rows where they are)
        cond_only = sum(step["branches"] == ["cond"] for step in manifest["cases"][key[2]]["results"]["steps"])
        helped, can_help = ranks[0]["helped", key]
        assert can_help == (world == 2)
        taylor = key[2].endswith("_taylorseer")
        assert helped == (cond_only if can_help and not taylor else 0)
        assert world != 2 or taylor or helped > 0
    # rank 0's cancel stops every rank before the same step; its failing callback ends the
    # others one step later, and only rank 0 raises it
    cancelled = [r["outcomes"][0] for r in ranks]
    assert cancelled == ["cancelled: denoising stopped before step 3 of 7: the request was cancelled"] * world
    assert [r["outcomes"][1] for r in ranks] == ["raised: client went away"] + [
        "cancelled: denoising stopped before step 3 of 7: the request was cancelled"] * (world - 1)


def test_config_is_validated_naming_the_key():
    with pytest.raises(ValueError, match="parallel.cfg"):
        ParallelConfig(cfg=4)
    with pytest.raises(ValueError, match="parallel.sequence"):
        ParallelConfig(sequence=0)
    ParallelConfig(2, 4).check_heads(28, 4)  # the real model: cfg 2 x sequence 4
    with pytest.raises(ValueError, match="parallel.sequence=3 must divide"):
        ParallelConfig(1, 3).check_heads(28, 4)
    with pytest.raises(ValueError, match="parallel.sequence=4 must divide"):
        ParallelConfig(1, 4).check_heads(4, 2)  # the tiny model
    assert ParallelConfig(2, 2).size == 4
    assert ParallelConfig(2, 3).coords(4) == (1, 1)


@pytest.mark.parametrize("n_lat,parts", [(16, 1), (16, 2), (16, 3), (20, 4), (4096, 4), (1, 3)])
def test_latent_shares_cover_the_block(n_lat, parts):
    sizes = row_split(n_lat + 2, parts)
    assert sum(sizes) == n_lat + 2 and max(sizes) - min(sizes) <= 1
    shares = latent_shares(n_lat, parts)
    covered = [i for lo, hi in shares for i in range(lo, hi)]
    assert covered == list(range(n_lat))
    # a range's latents are its rows less the markers it holds
    for s, ((lo, hi), m) in enumerate(zip(shares, sizes)):
        assert hi - lo == m - (s == 0) - (s == parts - 1)


def contexts(img2img: bool) -> ImageContexts:
    gen = KVContext(torch.zeros(1, 2, 5, 1, 2), 5)
    cfg_img = KVContext(torch.zeros(1, 2, 3, 1, 2), 3) if img2img else gen.cut
    return ImageContexts(gen, Cut(0, 0), cfg_img, 64, 64)


def test_branch_plan_deals_running_branches_round_robin():
    edit = BranchPlan.of(contexts(True), DenoiseParams(cfg_img_scale=2.0), cfg=2)
    assert edit.run == ("cond", "cfg_text", "cfg_img") and edit.same == frozenset()
    assert [edit.branches_of(c) for c in range(2)] == [("cond", "cfg_img"), ("cfg_text",)]
    text = BranchPlan.of(contexts(False), DenoiseParams(cfg_img_scale=1.5), cfg=3)
    assert text.run == ("cond", "cfg_text") and text.same == frozenset({"cfg_img"})
    assert text.branches_of(2) == ()  # a third cfg rank idles on a two-branch request
    plain = BranchPlan.of(contexts(False), DenoiseParams(cfg_text_scale=1.0), cfg=2)
    assert plain.run == ("cond",)
    shares = edit.share(contexts(True), 1)
    assert list(shares) == ["cfg_text"] and shares["cfg_text"].length == 0


# -- several requests denoised together over the ranks (cross-request batching) -------------------

# (world size, grids): CFG parallel, sequence parallel and both; 3 ranks idle a cfg index on
# two-branch jobs and help no cond (3 does not divide the heads)
BATCH_GRIDS = {2: [(2, 1), (1, 2)], 3: [(3, 1)], 4: [(2, 2)]}
# name: (golden case, changes, the step of the batch it joins at, its should_stop's yes from this ask on)
BATCH_JOBS = {
    # 2 branches, cond only outside cfg_interval (cond spread over every rank at 2 and 4 ranks)
    "fox": ("text2img", {}, 0, None),
    # 3 branches (think: cfg_img is a context of its own), its own seed and steps
    "think": ("text2img_think", {"seed": 5, "num_inference_steps": 6, "cfg_img_scale": 1.5, "init_noise": None}, 2, None),
    # TaylorSeer: per-branch caches on the branches' ranks, beside exact jobs
    "taylor": ("text2img_taylorseer", {}, 1, None),
    # cancelled by rank 0 before its 4th step; the others go on
    "gone": ("text2img", {"seed": 21, "num_inference_steps": 10, "cfg_text_scale": 2.5, "cfg_interval": (0.0, 1.0),
                          "init_noise": None}, 1, 4),
}


def batch_request(manifest: dict, golden_dir: Path, name: str):
    case_name, changes, _, _ = BATCH_JOBS[name]
    case = manifest["cases"][case_name]
    return replace(image_request(case, golden_dir, load_case_tensors(golden_dir, case)), **changes)


def _batch_rank_main(rank: int, world: int, port: int, golden_dir: str, out: str) -> None:
    """One rank steps the jobs of `BATCH_JOBS` as one batch on each grid of its world, each
    joining at its step and leaving when it ends; saves each job's end (every rank) and the
    batch sizes its step records saw (rank 0)."""
    from bagel_ray.engine.dit_parallel import ParallelDiT

    golden, manifest, pipeline = _join_golden(rank, world, port, golden_dir)
    requests = {name: batch_request(manifest, golden, name) for name in BATCH_JOBS}
    prepared = {name: pipeline.prepare_image(req) for name, req in requests.items()}
    results = {}
    for cfg, seq in BATCH_GRIDS[world]:
        engine = ParallelDiT(pipeline.dit, ParallelConfig(cfg, seq))
        batches: dict[str, list[int]] = {name: [] for name in BATCH_JOBS}
        running, ended, index = [], {}, 0
        while index == 0 or running:
            for name, (_, _, joins, stop_from) in BATCH_JOBS.items():
                if joins != index:
                    continue
                asked = []

                def stop(asked=asked, stop_from=stop_from) -> bool:
                    asked.append(1)
                    return stop_from is not None and len(asked) >= stop_from

                ctx, req = prepared[name].contexts, requests[name]
                plan = BranchPlan.of(ctx, req.sampler(), cfg)
                job = engine.job(plan, engine.share(plan, ctx), ctx.height, ctx.width, req.sampler(), prepared[name].noise,
                                 lambda record, name=name: batches[name].append(record.batch), stop)
                running.append((name, job))
            engine.step([job for _, job in running])
            ended.update((name, job) for name, job in running if job.done)
            running = [(name, job) for name, job in running if not job.done]
            index += 1
        results[cfg, seq] = {name: (job.x, job.index, None if job.error is None else str(job.error), batches[name])
                             for name, job in ended.items()}
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("world", sorted(BATCH_GRIDS))
def test_a_batch_of_jobs_over_the_ranks_gives_each_its_one_process_latents(world, golden_dir, manifest, golden_pipeline,
                                                                          tmp_path, worker_threads):
    """Jobs of different seeds, steps, CFG and branch counts (TaylorSeer among them) join the
    batch at different steps and share its forwards; each one's latents equal it run alone
    in one process (the golden float32 tolerance), the cancelled one ends before the same
    step on every rank, and every rank holds the same numbers."""
    torch.multiprocessing.spawn(_batch_rank_main, args=(world, free_port(), str(golden_dir), str(tmp_path)), nprocs=world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    tol = manifest["cases"]["text2img"]["tensors"]["final_latent_packed"]["compare"]
    alone, totals = {}, {}
    for name in BATCH_JOBS:
        req = batch_request(manifest, golden_dir, name)
        prepared = golden_pipeline.prepare_image(req)
        job = golden_pipeline.dit.job(prepared.contexts, req.sampler(), prepared.noise)
        while not job.done:
            golden_pipeline.dit.step([job])
        alone[name], totals[name] = job.x, job.total
    for grid in BATCH_GRIDS[world]:
        ended = ranks[0][grid]
        assert sorted(ended) == sorted(BATCH_JOBS)
        for r in range(1, world):  # every rank took the same steps on the same numbers
            for name, (x, index, error, _) in ranks[r][grid].items():
                assert torch.equal(x, ended[name][0]) and index == ended[name][1], (grid, name, r)
                assert error == ended[name][2], (grid, name, r)
        for name, (x, index, error, batches) in ended.items():
            if name == "gone":
                assert (index, error) == (3, f"denoising stopped before step 4 of {totals[name]}: the request was cancelled")
                continue
            assert error is None and index == totals[name], (grid, name)
            torch.testing.assert_close(x, alone[name], atol=tol["atol"], rtol=tol["rtol"], msg=f"{grid} {name}")
        # the jobs shared steps: all four at once from the third step of the batch
        assert max(ended["fox"][3]) == 4 and ended["fox"][3][0] == 1, (grid, ended["fox"][3])
        assert min(ended["think"][3]) >= 2
