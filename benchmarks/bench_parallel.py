"""One image over several GPUs (issue 21): CFG-parallel and sequence-parallel denoising
against the one-GPU path, full-size random bf16 weights, one request at a time.

    python -m benchmarks.bench_parallel [--gpus N] [--rows ...] [--steps 50] [--reps 3] [--json FILE]
    python -m benchmarks.bench_parallel --smoke        # the tiny config on CPU ranks over gloo
    python -m benchmarks.bench_parallel --gpus 2 --share-gpus --side 512   # 2 ranks on one card (plumbing)

One command: it starts one process per visible GPU (`--gpus`, default all of them, at most
8), joined in an NCCL group; each row runs on the first cfg x sequence ranks. Rows (issue
targets in brackets; a row needing more ranks than there are is skipped). `--share-gpus`
puts ranks on the visible cards in turn, joined over gloo (NCCL refuses two ranks on one card):
it checks the plumbing and the guard on fewer GPUs, not the speed. `--side` changes the image
size of every row (1024 by default; the row names keep theirs):

  t2i1024_1gpu         text2img 1024², 50 steps, notebook settings, the exact one-GPU path [9.0 s]
  t2i1024_cfg2         the same on 2 GPUs, CFG parallel [<= 5.0 s]
  t2i1024_cfg2_seq2    4 GPUs, CFG 2 x sequence 2 [<= 2.8 s]
  t2i1024_cfg2_seq4    8 GPUs, CFG 2 x sequence 4 [<= 1.8 s]
  t2i1024_seq2         2 GPUs, sequence parallel only (for comparison with cfg2)
  t2i1024_cfg2_idle    cfg2 with the second rank idle at the steps outside cfg_interval (the
                       other rows split cond over both ranks there: `help_cond`)
  t2i1024_cfg2_seq2_idle  the same for cfg 2 x sequence 2 (cond over 4 ranks, or over its 2)
  edit1024_1gpu        img2img 1024² input, 50 steps, edit defaults, one GPU [17.6 s today]
  edit1024_cfg3        the same on 3 GPUs, CFG parallel [<= 7.0 s]

A request's time is rank 0's, from its prefill (every rank builds the same contexts itself, at
the same time; a Serve replica ships them from rank 0 instead) to the decoded image, median of
--reps after a 3-step warm-up. Correctness guard, as `bench_pipeline`'s: each parallel row's
latents against the one-GPU latents of the same request, relative L2, within twice the floor
(how far the one-GPU latents move when the initial noise moves by one bf16 rounding), and the
mean pixel difference under 2 / 255; `guard_ok` says whether both hold. The one-GPU path
replays the DiT's layers as CUDA graphs where the shape fits (`DitGraphs`: up to 4,096 rows a
forward). Each parallel row runs twice by default (`--parallel-layers both`): with its layers
as graphs between the split attentions, whose collectives stay outside them
(`dit.parallel.cuda_graphs`), and eagerly (named `ROW (eager)`, a Serve replica's default), to
measure what the graphs bring there; `graphs` or `eager` runs one of them (`--smoke`: eager,
the CPU has no graphs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bagel_ray.engine.dit_parallel import ParallelConfig, ParallelDiT
from bagel_ray.engine.request import GenerationRequest
from benchmarks.bench_pipeline import EDIT_PROMPT, PROMPT, image, random_pipeline
from benchmarks.table import print_table
from benchmarks.time_to_ready import free_port

# row -> (modality, cfg ranks, sequence ranks, issue target in seconds or None, help_cond)
ROWS = {
    "t2i1024_1gpu": ("text2img", 1, 1, 9.0, True),
    "t2i1024_cfg2": ("text2img", 2, 1, 5.0, True),
    "t2i1024_cfg2_seq2": ("text2img", 2, 2, 2.8, True),
    "t2i1024_cfg2_seq4": ("text2img", 2, 4, 1.8, True),
    "t2i1024_seq2": ("text2img", 1, 2, None, True),
    "t2i1024_cfg2_idle": ("text2img", 2, 1, None, False),
    "t2i1024_cfg2_seq2_idle": ("text2img", 2, 2, None, False),
    "edit1024_1gpu": ("img2img", 1, 1, None, True),
    "edit1024_cfg3": ("img2img", 3, 1, 7.0, True),
}
SMOKE_ROWS = "t2i1024_1gpu,t2i1024_cfg2,t2i1024_cfg2_idle,t2i1024_seq2,t2i1024_cfg2_seq2,edit1024_1gpu,edit1024_cfg3"
FLOOR_FACTOR = 2.0  # latents within 2x the bf16 floor (bench_pipeline's guard)
PIXEL_MEAN_MAX = 2.0


def request(modality: str, side: int, steps: int) -> GenerationRequest:
    if modality == "img2img":
        return GenerationRequest("img2img", EDIT_PROMPT, image=image(side), num_inference_steps=steps, seed=11)
    return GenerationRequest("text2img", PROMPT, height=side, width=side, num_inference_steps=steps, seed=11)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_row(pipe, engine: ParallelDiT | None, req: GenerationRequest, device: str, rank: int):
    """One request: rank 0's (seconds, denoise seconds, latents, image); others (.., None)."""
    sync(device)
    t0 = time.perf_counter()
    prepared = pipe.prepare_image(req)
    t1 = time.perf_counter()
    if engine is None:
        latents = pipe.dit.denoise(prepared.contexts, req.sampler(), prepared.noise)
    else:
        latents = engine.denoise_contexts(prepared.contexts, req.sampler(), prepared.noise)
    sync(device)
    t2 = time.perf_counter()
    picture = pipe.finish_image(req, prepared, latents, {}).image if rank == 0 else None
    sync(device)
    return time.perf_counter() - t0, t2 - t1, latents.float().cpu(), picture


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@dataclass
class Rank:
    """One rank's run: its pipeline, engines and groups, and (rank 0) the rows so far and each
    modality's one-GPU reference (latents and image, seconds, bf16 floor)."""

    rank: int
    device: str
    args: argparse.Namespace
    pipe: Any
    engines: dict = field(default_factory=dict)  # (cfg, seq) -> ParallelDiT
    groups: dict = field(default_factory=dict)  # size -> the group of the first `size` ranks
    results: list = field(default_factory=list)
    reference: dict = field(default_factory=dict)
    reference_s: dict = field(default_factory=dict)
    floors: dict = field(default_factory=dict)


def run_one(r: Rank, name: str, req: GenerationRequest, graphs: bool) -> None:
    """Row `name` on this rank (one of its first cfg x seq), its layers as CUDA graphs or eager;
    rank 0 appends the row's figures and guard to `r.results` (a one-rank row is the reference
    of its modality)."""
    _, cfg, seq, target, help_cond = ROWS[name]
    pipe, engines, groups, device, rank, args = r.pipe, r.engines, r.groups, r.device, r.rank, r.args
    results, reference, reference_s, floors = r.results, r.reference, r.reference_s, r.floors
    modality, size = req.modality, cfg * seq
    if size > 1 and (cfg, seq) not in engines:
        engines[cfg, seq] = ParallelDiT(pipe.dit, ParallelConfig(cfg, seq), groups[size])
    engine = engines.get((cfg, seq)) if size > 1 else None
    if engine is not None:
        engine.help_cond = help_cond and engine.can_help
        engine.cuda_graphs = graphs
    run_row(pipe, engine, GenerationRequest(**{**req.__dict__, "num_inference_steps": 3}), device, rank)  # warm-up
    runs = [run_row(pipe, engine, req, device, rank) for _ in range(args.reps)]
    seconds, denoise_s = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    _, _, latents, picture = runs[-1]
    if rank == 0:
        row = {"row": f"{name} (eager)" if args.parallel_layers == "both" and not graphs else name, "seconds": seconds, "denoise_s": denoise_s, "ranks": size, "target_s": target,
               "help_cond": engine is not None and engine.help_cond, "graphs": graphs}
        if size == 1:
            reference[modality] = (latents, picture)
            reference_s[modality] = seconds
            # the floor: the same path from the initial noise moved by one bf16 rounding
            noise = pipe.prepare_image(req).noise
            nudged = pipe.run(GenerationRequest(**{**req.__dict__, "init_noise": noise.bfloat16().float()}))
            floors[modality] = rel_l2(nudged.latent_tokens.float().cpu(), latents)
        elif modality in reference:
            want, want_picture = reference[modality]
            row["speedup"] = reference_s[modality] / seconds
            pixels = np.abs(np.asarray(picture, dtype=np.int16) - np.asarray(want_picture, dtype=np.int16))
            row.update(latent_rel_l2=rel_l2(latents, want), floor_rel_l2=floors[modality],
                       pixel_mean=float(pixels.mean()), pixel_max=int(pixels.max()))
            row["guard_ok"] = (row["latent_rel_l2"] <= FLOOR_FACTOR * floors[modality]
                               and row["pixel_mean"] <= PIXEL_MEAN_MAX)
        results.append(row)
        print(row, flush=True)


def worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        torch.set_num_threads(1)
    dist.init_process_group("gloo" if args.smoke or args.share_gpus else "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=600))
    side = 128 if args.smoke else args.side
    r = Rank(rank, device, args, random_pipeline(args.smoke))
    results, groups = r.results, r.groups
    for name in args.rows.split(","):
        modality, cfg, seq, target, help_cond = ROWS[name]
        size = cfg * seq
        if size > world:
            if rank == 0:
                print(f"{name}: skipped, needs {size} ranks of {world}", flush=True)
            continue
        if size not in groups and size > 1:
            groups[size] = dist.new_group(list(range(size)))  # every rank, in the same order
        req = request(modality, side, args.steps)
        layer_modes = [True] if size == 1 else {"graphs": [True], "eager": [False], "both": [True, False]}[args.parallel_layers]
        for graphs in layer_modes:
            if rank < size:
                run_one(r, name, req, graphs)
        dist.barrier()
    failed = [r["row"] for r in results if r.get("guard_ok") is False]
    if rank == 0:
        print_table(results)
        if args.json:
            name = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name() + (" (shared by the ranks)" if args.share_gpus else "")
            with open(args.json, "w") as f:
                json.dump({"device": name, "ranks": world, "torch": torch.__version__, "results": results}, f, indent=2)
        if failed:
            print(f"correctness guard failed: {', '.join(failed)}", flush=True)
    dist.destroy_process_group()
    if failed:
        sys.exit(1)


def main() -> str | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=None, help="ranks (one a GPU); default: every visible GPU, at most 8")
    parser.add_argument("--rows", default=None, help=f"comma-separated, from {', '.join(ROWS)}")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; 4 with --smoke)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("--side", type=int, default=1024, help="image side in pixels (default 1024)")
    parser.add_argument("--parallel-layers", choices=("graphs", "eager", "both"), default=None,
                        help="the parallel rows' layers as CUDA graphs, eagerly, or each row both ways (default; "
                             "eager with --smoke: CPUs have no graphs)")
    parser.add_argument("--share-gpus", action="store_true", help="more ranks than GPUs, over gloo (plumbing, not speed)")
    parser.add_argument("--smoke", action="store_true", help="the tiny config on 4 CPU ranks over gloo, to check the script")
    args = parser.parse_args()
    args.rows = args.rows or (SMOKE_ROWS if args.smoke else ",".join(ROWS))
    unknown = [r for r in args.rows.split(",") if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    args.steps = args.steps or (4 if args.smoke else 50)
    args.parallel_layers = args.parallel_layers or ("eager" if args.smoke else "both")
    if args.smoke:
        world = args.gpus or 4
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA GPU: run with --smoke to check the script on CPUs")
        world = args.gpus or min(torch.cuda.device_count(), 8)
        if world > torch.cuda.device_count() and not args.share_gpus:
            parser.error(f"--gpus {world}, but {torch.cuda.device_count()} GPU(s) are visible (--share-gpus puts several on one)")
    print(f"{world} rank(s), rows {args.rows}, {args.steps} steps, {args.reps} reps", flush=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        mp.spawn(worker, args=(world, free_port(), args), nprocs=world)
    except mp.ProcessExitedException as exc:
        return f"a rank exited with code {exc.exit_code}"


if __name__ == "__main__":
    sys.exit(main())
