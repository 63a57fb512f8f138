"""End-to-end benchmark through Ray Serve on one GPU: both stages as replicas sharing the card,
full-size random weights (`model: random-7b`), real HTTP.

    python -m benchmarks.bench_serve [--json FILE] [--dit-max-batch-size N]
    python -m benchmarks.bench_serve --smoke   # every row on the CPU with the tiny model (deployments/tiny.yaml)

Rows: time to ready; text2img 512^2 / 20 steps / cfg_text 4 / cfg_img 1.5, one request at a time
[<= 1.0 s], with one prompt and then with prompts of lengths not seen before (what a
length-dependent setup, such as an attention plan, adds); the same with 8 concurrent clients
[>= 1.5 images/s], which the DiT replica denoises together (`dit.max_batch_size`, 8 by default;
1 for the one-at-a-time baseline), then again with the TaylorSeer step cache on (`taylorseer`,
issue 20) [>= 2.5 images/s], the same seeds beside the exact row (its mean pixel distance from
the exact images is stated, as the exact path is what it approximates); img2img 512^2 / 20 steps
[<= 1.5 s]; chat decoding of 128 tokens, one stream and 32 concurrent [>= 180 / >= 2500 tok/s].
The one-request rows and the chat rows are medians of three (requests, or bursts of 32 streams),
all three listed in the JSON. `--smoke` runs the same rows at the tiny model's sizes (64^2, 8
steps, 8 tokens, 4 streams), to check the script itself.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import requests
import yaml
from PIL import Image

from benchmarks.table import print_table
from benchmarks.time_to_ready import TINY_CONFIG_YAML, free_port

PORT = 8000
PROMPT = "A photo of a red fox sleeping under an old oak tree in autumn, soft morning light, shallow depth of field."

APP_ARGS = {
    "model": "random-7b",
    "edit_contexts_on": "dit",
    "request_timeout_s": 600,
    "ingress": {"num_replicas": 1, "max_ongoing_requests": 512, "ray_actor_options": {"num_cpus": 1}},
    "thinker": {"num_replicas": 1, "max_ongoing_requests": 64, "max_queued_requests": 256, "max_batch_size": 32,
                "batch_wait_timeout_s": 0.01, "gpu_memory_utilization": 0.3, "dtype": "bfloat16",
                "ray_actor_options": {"num_cpus": 2, "num_gpus": 0.4}},
    "dit": {"num_replicas": 1, "max_ongoing_requests": 16, "max_queued_requests": 256, "max_batch_size": 8,
            "gpu_memory_utilization": 0.65, "dtype": "bfloat16", "ray_actor_options": {"num_cpus": 2, "num_gpus": 0.6}},
}


@dataclass(frozen=True)
class Setup:
    """Where the app listens and the sizes the rows ask for (the GPU's, or --smoke's)."""

    url: str
    size: int = 512
    steps: int = 20
    max_tokens: int = 128
    streams: int = 32


GPU = Setup(f"http://127.0.0.1:{PORT}")


def smoke_setup() -> tuple[dict, Setup]:
    """The tiny app of deployments/tiny.yaml (CPU, fp32) on a free port, at sizes that take
    seconds: enough steps that the step cache skips forwards (it runs the first five in full)."""
    app_args = yaml.safe_load(TINY_CONFIG_YAML.read_text())["applications"][0]["args"]
    return app_args, Setup(f"http://127.0.0.1:{free_port()}", size=64, steps=8, max_tokens=8, streams=4)


def t2i_image(setup: Setup, seed: int, prompt: str = PROMPT, taylorseer: bool = False) -> tuple[float, np.ndarray]:
    """One text2img request: its latency and its pixels."""
    t0 = time.perf_counter()
    r = requests.post(setup.url + "/v1/images/generations",
                      json={"prompt": prompt, "size": f"{setup.size}x{setup.size}", "num_inference_steps": setup.steps,
                            "cfg_text_scale": 4.0, "cfg_img_scale": 1.5, "seed": seed, "taylorseer": taylorseer}, timeout=600)
    r.raise_for_status()
    seconds = time.perf_counter() - t0
    png = base64.b64decode(r.json()["data"][0]["b64_json"])
    return seconds, np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def t2i(setup: Setup, seed: int, prompt: str = PROMPT) -> float:
    return t2i_image(setup, seed, prompt)[0]


def clients8(setup: Setup, taylorseer: bool) -> tuple[dict, list[np.ndarray]]:
    """16 text2img requests (seeds 100-115) from 8 concurrent clients: the row and the images."""
    with ThreadPoolExecutor(8) as pool:
        t0 = time.perf_counter()
        out = list(pool.map(lambda seed: t2i_image(setup, seed, taylorseer=taylorseer), range(100, 116)))
        wall = time.perf_counter() - t0
    row = {"row": "t2i512_8clients_taylorseer" if taylorseer else "t2i512_8clients", "seconds": wall, "images_per_s": 16 / wall,
           "median_latency": statistics.median(s for s, _ in out)}
    return row, [img for _, img in out]


def edit(setup: Setup, seed: int, png: bytes) -> float:
    t0 = time.perf_counter()
    r = requests.post(setup.url + "/v1/images/edits", files={"image": ("in.png", png, "image/png")},
                      data={"prompt": "Make the sky purple.", "num_inference_steps": str(setup.steps), "seed": str(seed)},
                      timeout=600)
    r.raise_for_status()
    return time.perf_counter() - t0


def chat(setup: Setup, i: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    r = requests.post(setup.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": f"{PROMPT} ({i})"}],
                                                                "max_tokens": setup.max_tokens}, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--dit-max-batch-size", type=int, default=APP_ARGS["dit"]["max_batch_size"],
                        help="image requests of one size the DiT denoises together (1: one at a time)")
    parser.add_argument("--smoke", action="store_true", help="the tiny model on the CPU, to check the script itself")
    args = parser.parse_args()
    base, setup = smoke_setup() if args.smoke else (APP_ARGS, GPU)
    app_args = {**base, "dit": {**base["dit"], "max_batch_size": args.dit_max_batch_size}}
    import ray
    from ray import serve

    from bagel_ray.serve.app import build_app

    ray.init(include_dashboard=False, log_to_driver=False, **({"address": "local", "num_cpus": 4} if args.smoke else {}))
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": int(setup.url.rsplit(":", 1)[1])})
        t0 = time.perf_counter()
        serve.run(build_app(app_args), name="bagel", route_prefix="/")
        rows = [{"row": "ready_tiny" if args.smoke else "ready_random_weights", "seconds": time.perf_counter() - t0}]
        print(rows[-1], flush=True)
        rows += run_rows(setup, args.dit_max_batch_size)
        print_table(rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"smoke": args.smoke, "rows": rows}, f, indent=2)
    finally:
        serve.shutdown()
        ray.shutdown()


def run_rows(setup: Setup, dit_max_batch_size: int) -> list[dict]:
    """Every row after the app is ready, printed as it comes."""
    rows = []

    def add(row: dict) -> None:
        rows.append(row)
        print(row, flush=True)

    t2i(setup, 0)  # warm-up
    lat = [t2i(setup, s) for s in range(1, 4)]
    add({"row": "t2i512_serve", "seconds": statistics.median(lat), "all": lat})
    lat = [t2i(setup, s, PROMPT + " Seen from afar." * (s + 1)) for s in range(3)]
    add({"row": "t2i512_serve_new_lengths", "seconds": statistics.median(lat), "all": lat})

    exact, exact_images = clients8(setup, taylorseer=False)
    add({**exact, "dit_max_batch_size": dit_max_batch_size})
    t2i_image(setup, 0, taylorseer=True)  # warm-up of the cached path, as the exact one had
    cached, cached_images = clients8(setup, taylorseer=True)
    pixel_diff = [float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean()) for a, b in zip(cached_images, exact_images)]
    add({**cached, "dit_max_batch_size": dit_max_batch_size, "speedup": exact["seconds"] / cached["seconds"],
         "exact_images_per_s": exact["images_per_s"], "pixel_mean_abs_diff_vs_exact": statistics.mean(pixel_diff)})

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (setup.size, setup.size, 3), dtype=np.uint8)).save(buf, format="PNG")
    edit(setup, 0, buf.getvalue())
    lat = [edit(setup, s, buf.getvalue()) for s in range(1, 4)]
    add({"row": "edit512_serve", "seconds": statistics.median(lat), "all": lat})

    chat(setup, 0)
    one = [chat(setup, i) for i in range(1, 4)]
    rates = [toks / secs for secs, toks in one]
    secs, toks = one[rates.index(statistics.median(rates))]
    add({"row": "decode_b1_serve", "seconds": secs, "tokens": toks, "tok_per_s": toks / secs, "all_tok_per_s": rates})
    bursts = []  # (wall, tokens) of each burst of concurrent streams; the row is the median burst
    for burst in range(3):
        with ThreadPoolExecutor(setup.streams) as pool:
            t0 = time.perf_counter()
            out = list(pool.map(lambda i: chat(setup, i), range(100 * (burst + 1), 100 * (burst + 1) + setup.streams)))
            bursts.append((time.perf_counter() - t0, sum(n for _, n in out)))
    rates = [toks / wall for wall, toks in bursts]
    wall, toks = bursts[rates.index(statistics.median(rates))]
    add({"row": "decode_32streams_serve", "seconds": wall, "tokens": toks, "tok_per_s": toks / wall, "streams": setup.streams,
         "all_tok_per_s": rates})
    return rows


if __name__ == "__main__":
    main()
