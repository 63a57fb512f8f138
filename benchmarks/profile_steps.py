"""Where the GPU time of one step goes: a kernel table for the steps the issue-6 targets hang on.

    python -m benchmarks.profile_steps [--cases decode1,decode32,t2i512,edit512,t2i1024,edit1024] [--top 15] [--smoke]

For each case it times the step alone (wall, device synchronized) and profiles a few steps
with torch.profiler: the sum of kernel time against the wall time says whether the step is
bound by the GPU's work or by gaps between kernels (launches, host syncs), and the kernel
table says which work. Full-size random bf16 weights, one GPU (`--smoke`: the tiny config on
the CPU, to check the script itself; its tables are of CPU ops).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from bagel_ray.engine.pipeline import LocalPipeline
from bagel_ray.engine.request import GenerationRequest
from bagel_ray.engine.decoder import DecodeParams
from benchmarks.bench_pipeline import EDIT_PROMPT, PROMPT, image, random_pipeline, sync


def kernel_table(prof, steps: int, top: int) -> tuple[float, list[tuple[str, float, int]]]:
    """Total kernel milliseconds per step and the `top` kernels (name, ms per step, calls per step);
    off the GPU, the top-level CPU ops instead."""
    kind = torch.autograd.DeviceType.CUDA if torch.cuda.is_available() else torch.autograd.DeviceType.CPU
    per_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == kind and (kind == torch.autograd.DeviceType.CUDA or event.cpu_parent is None):
            entry = per_name[event.name[:90]]
            entry[0] += event.time_range.elapsed_us() / 1e3
            entry[1] += 1
    total = sum(ms for ms, _ in per_name.values()) / steps
    rows = sorted(((name, ms / steps, calls // steps) for name, (ms, calls) in per_name.items()), key=lambda r: -r[1])
    return total, rows[:top]


def measure(name: str, fn, steps: int, top: int) -> None:
    for _ in range(3):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    wall = (time.perf_counter() - t0) / steps * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        sync()
    busy, rows = kernel_table(prof, steps, top)
    print(f"\n== {name}: {wall:.2f} ms a step (wall), kernels {busy:.2f} ms ({busy / wall:.0%} busy)")
    for kernel, ms, calls in rows:
        print(f"  {ms:8.3f} ms  {calls:5d}x  {kernel}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="decode1,decode32,t2i512,edit512")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--smoke", action="store_true", help="the tiny config on the CPU, to check the script itself")
    args = parser.parse_args()
    cases = args.cases.split(",")
    side = 64 if args.smoke else 512
    print(f"device: {'cpu (smoke)' if args.smoke else torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    pipe = random_pipeline(args.smoke)
    th, dit = pipe.thinker, pipe.dit

    for batch in (1, 32):
        if f"decode{batch}" not in cases:
            continue
        contexts = [th.append_text(th.empty(), f"{PROMPT} ({i})") for i in range(batch)]
        n = 64

        def decode() -> None:
            for _ in th.decode_steps(contexts, DecodeParams(max_new_tokens=n)):
                pass

        decode()
        sync()
        t0 = time.perf_counter()
        decode()
        sync()
        per_token = (time.perf_counter() - t0) / n * 1e3
        print(f"\n== decode batch {batch}: {per_token:.2f} ms a step including setup and capture "
              f"({batch * 1e3 / per_token:.0f} tok/s)")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            decode()
            sync()
        busy, rows = kernel_table(prof, n, args.top)
        print(f"   kernels {busy:.2f} ms a step")
        for kernel, ms, calls in rows:
            print(f"  {ms:8.3f} ms  {calls:5d}x  {kernel}")

    requests = {
        "t2i512": GenerationRequest("text2img", PROMPT, height=side, width=side, num_inference_steps=20, cfg_img_scale=1.5),
        "edit512": GenerationRequest("img2img", EDIT_PROMPT, image=image(side), num_inference_steps=20),
        "t2i1024": GenerationRequest("text2img", PROMPT, height=2 * side, width=2 * side),  # notebook settings
        "edit1024": GenerationRequest("img2img", EDIT_PROMPT, image=image(2 * side)),  # edit defaults
    }
    for name, req in requests.items():
        if name not in cases:
            continue
        prepared = pipe.prepare_image(req)
        job = dit.job(prepared.contexts, req.sampler(), prepared.noise)
        job.index = 2  # a step inside the CFG interval: every branch runs

        def one_step() -> None:
            job.index = 2
            dit.step([job])

        measure(f"{name} denoising step ({len(dit._guidance(job)[3])} branches)", one_step, 10, args.top)
        print(f"   context rows {prepared.contexts.gen.length}")
        timed_parts(pipe, req)


def timed_parts(pipe: LocalPipeline, req: GenerationRequest) -> None:
    """The parts of the Thinker side's `prepare_image` (contexts), each timed alone."""
    th = pipe.thinker
    parts = {"prepare_image": lambda: pipe.prepare_image(req), "text": lambda: th.append_text(th.empty(), req.prompt)}
    if req.image is not None:
        img = pipe.vae_resized(req.image)
        parts["vae"] = lambda: th.append_vae(th.empty(), img, torch.Generator().manual_seed(0))
        parts["vit"] = lambda: th.append_vit(th.empty(), img)
    for name, fn in parts.items():
        fn()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        print(f"   {name}: {(time.perf_counter() - t0) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
