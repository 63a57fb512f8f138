"""What the GPU's clock and power do under the work the 1024² rows hang on.

    python -m benchmarks.power_cap [--json FILE] [--smoke]

Loops, one after the other, each for a few seconds: a text2img 1024² denoising step (two CFG
branches, full-size random bf16 weights), one of its attention calls alone (4,098 query rows
over 4,140 keys, cuDNN), a bf16 8192³ GEMM (the `gemm` row of `bench_pipeline`, which times a
short burst), and nothing (sleep). `nvidia-smi` samples the SM clock, the power draw and the
active clock-throttle reasons every 50 ms meanwhile. Per phase: the time of one call (CUDA
events over the whole loop) and the samples' medians. An H100 SXM has a 700 W cap: when a loop
reaches it, the driver lowers the clock (throttle reason 0x4, "SW power cap"), and a sustained
rate is what the rows get, not the burst rate. `--smoke`: the tiny model on the CPU, no
sampling, to check the script itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

from bagel_ray.engine.request import GenerationRequest
from benchmarks.bench_pipeline import PROMPT, loop_ms, random_pipeline

QUERY = "timestamp,clocks.sm,power.draw,clocks_throttle_reasons.active"


class Sampler:
    """`nvidia-smi` in the background, one line every 50 ms; nothing where it is missing."""

    def __init__(self) -> None:
        exe = shutil.which("nvidia-smi")
        self.proc = None if exe is None else subprocess.Popen(
            [exe, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", "-lms", "50", "-i", "0"],
            stdout=subprocess.PIPE, text=True)

    def stop(self) -> list[tuple[float, float, float, str]]:
        """(time, SM MHz, watts, throttle reasons) per sample, on this host's clock."""
        if self.proc is None:
            return []
        self.proc.terminate()
        samples = []
        for line in self.proc.communicate()[0].strip().splitlines():
            stamp, mhz, watts, reasons = (x.strip() for x in line.split(","))
            when = datetime.datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp()
            samples.append((when, float(mhz), float(watts), reasons))
        return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true", help="the tiny model on the CPU, no sampling")
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    pipe = random_pipeline(args.smoke)
    side = 64 if args.smoke else 1024
    req = GenerationRequest("text2img", PROMPT, height=side, width=side)  # notebook settings
    prepared = pipe.prepare_image(req)
    job = pipe.dit.job(prepared.contexts, req.sampler(), prepared.noise)

    def step() -> None:
        job.index = 2  # inside the CFG interval: both branches
        pipe.dit.step([job])

    heads, kv, dim, rows, keys, n = (4, 2, 16, 66, 80, 256) if args.smoke else (28, 4, 128, 4098, 4140, 8192)
    qk = torch.randn(1, rows, heads + kv, dim, device=device, dtype=dtype)
    q = qk[:, :, :heads].transpose(1, 2)  # the DiT's layout: a view of the normed q/k heads
    k, v = (torch.randn(1, kv, keys, dim, device=device, dtype=dtype) for _ in range(2))
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    phases = {  # name: (one call, calls in the loop; ~5 s each on an H100)
        "t2i1024 step (2 branches)": (step, 2 if args.smoke else 25),
        "its attention call alone": (lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), 20 if args.smoke else 10_000),
        f"GEMM {n}³": (lambda: a @ b, 5 if args.smoke else 3_000),
        "idle": (lambda: time.sleep(0.05), 10 if args.smoke else 40),
    }
    sampler = Sampler()
    timed = {name: loop_ms(fn, reps, device) for name, (fn, reps) in phases.items()}
    samples = sampler.stop()
    name = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name()
    print(f"device: {name}, torch {torch.__version__}")
    rows_out = []
    for phase, (ms, t0, t1) in timed.items():
        settle = min(0.25, (t1 - t0) / 4)  # the clock takes a moment to follow the load
        inside = [s for s in samples if t0 + settle <= s[0] <= t1]
        row = {"phase": phase, "ms_per_call": ms, "samples": len(inside)}
        if inside:
            row |= {"sm_mhz": statistics.median(s[1] for s in inside), "sm_mhz_min": min(s[1] for s in inside),
                    "watts": statistics.median(s[2] for s in inside),
                    "throttle_reasons": sorted({s[3] for s in inside})}
        if phase.startswith("GEMM"):
            row["tflops"] = 2 * n**3 / (ms * 1e-3) / 1e12
        rows_out.append(row)
    print("\n| phase | one call | SM clock (median, min) | power | throttle reasons |\n|---|---:|---:|---:|---|")
    for r in rows_out:
        rate = f" ({r['tflops']:.0f} TFLOP/s)" if "tflops" in r else ""
        clock = f"{r['sm_mhz']:.0f} / {r['sm_mhz_min']:.0f} MHz" if "sm_mhz" in r else "-"
        power = f"{r['watts']:.0f} W" if "watts" in r else "-"
        print(f"| {r['phase']} | {r['ms_per_call']:.3f} ms{rate} | {clock} | {power} | {' '.join(r.get('throttle_reasons', []))} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "rows": rows_out}, f, indent=1)


if __name__ == "__main__":
    main()
