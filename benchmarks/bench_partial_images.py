"""What streamed partial images cost the final image: text2img at 512² (the official 50
steps), without previews and with 3 (the most OpenAI allows), alternated in one process.

    python -m benchmarks.bench_partial_images [--side 512] [--reps 5] [--json FILE] [--smoke]

A preview is made as the DiT's worker makes it (`LocalPipeline.preview` in the step's
callback, at `preview_steps`): the x0 estimate VAE-decoded to a PIL image. The encoding of the
preview (PNG, on the ingress) is not counted: it runs off the DiT. The budget (issue 23) is
5 % over the image without previews. `--smoke`: the tiny random model on the CPU, to check the
script itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bagel_ray.engine.request import GenerationRequest, preview_steps
from benchmarks.bench_pipeline import random_pipeline
from benchmarks.table import print_table


def run_once(pipe, req: GenerationRequest, previews: int) -> tuple[float, int]:
    prepared = pipe.prepare_image(req)
    made = []
    steps: frozenset[int] | None = None

    def on_step(record) -> None:
        nonlocal steps
        if steps is None:
            steps = preview_steps(record.total, previews)
        if record.index in steps:
            made.append(pipe.preview(prepared, record))

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    pipe.render(req, prepared, on_step)  # ends in the VAE decode and its PIL image: synchronized
    return time.perf_counter() - t0, len(made)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true", help="the tiny config on the CPU, to check the script itself")
    args = parser.parse_args()
    side = 32 if args.smoke else args.side
    pipe = random_pipeline(args.smoke)
    req = GenerationRequest("text2img", "a lighthouse on a cliff at dusk", height=side, width=side,
                            num_inference_steps=args.steps, seed=0)
    run_once(pipe, GenerationRequest("text2img", "warm", height=side, width=side, num_inference_steps=4), 3)  # warm-up
    times: dict[int, list[float]] = {0: [], 3: []}
    counts = {}
    for _ in range(args.reps):
        for previews in times:
            seconds, counts[previews] = run_once(pipe, req, previews)
            times[previews].append(seconds)
    base, with_previews = statistics.median(times[0]), statistics.median(times[3])
    device = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name()
    rows = [{"row": f"t2i{side}_no_previews", "seconds": base, "previews": counts[0]},
            {"row": f"t2i{side}_3_previews", "seconds": with_previews, "previews": counts[3],
             "overhead_pct": 100 * (with_previews / base - 1)}]
    print(f"device: {device}; {args.steps} steps, median of {args.reps}")
    print_table(rows)
    print(f"overhead of 3 previews: {rows[1]['overhead_pct']:.1f} % (budget 5 %)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
