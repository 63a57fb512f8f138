"""End-to-end benchmark through Ray Serve on one GPU: both stages as replicas sharing the card,
full-size random weights (`model: random-7b`), real HTTP.

    python -m benchmarks.bench_serve [--json FILE] [--dit-max-batch-size N]

Rows: time to ready; text2img 512^2 / 20 steps / cfg_text 4 / cfg_img 1.5, one request at a time
[<= 1.0 s], with one prompt and then with prompts of lengths not seen before (what a
length-dependent setup, such as an attention plan, adds); the same with 8 concurrent clients
[>= 1.5 images/s], which the DiT replica denoises together (`dit.max_batch_size`, 8 by default;
1 for the one-at-a-time baseline); img2img 512^2 / 20 steps [<= 1.5 s]; chat decoding of 128
tokens, one stream and 32 concurrent [>= 180 / >= 2500 tok/s]. The one-request rows and the chat
rows are medians of three (requests, or bursts of 32 streams), all three listed in the JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests
from PIL import Image

from benchmarks.table import print_table

PORT = 8000
URL = f"http://127.0.0.1:{PORT}"
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


def t2i(seed: int, prompt: str = PROMPT) -> float:
    t0 = time.perf_counter()
    r = requests.post(URL + "/v1/images/generations", json={"prompt": prompt, "size": "512x512", "num_inference_steps": 20,
                                                            "cfg_text_scale": 4.0, "cfg_img_scale": 1.5, "seed": seed}, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - t0


def edit(seed: int, png: bytes) -> float:
    t0 = time.perf_counter()
    r = requests.post(URL + "/v1/images/edits", files={"image": ("in.png", png, "image/png")},
                      data={"prompt": "Make the sky purple.", "num_inference_steps": "20", "seed": str(seed)}, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - t0


def chat(i: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    r = requests.post(URL + "/v1/chat/completions", json={"messages": [{"role": "user", "content": f"{PROMPT} ({i})"}],
                                                          "max_tokens": 128}, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--dit-max-batch-size", type=int, default=APP_ARGS["dit"]["max_batch_size"],
                        help="image requests of one size the DiT denoises together (1: one at a time)")
    args = parser.parse_args()
    app_args = {**APP_ARGS, "dit": {**APP_ARGS["dit"], "max_batch_size": args.dit_max_batch_size}}
    import ray
    from ray import serve

    from bagel_ray.serve.app import build_app

    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    t0 = time.perf_counter()
    serve.run(build_app(app_args), name="bagel", route_prefix="/")
    rows = [{"row": "ready_random_weights", "seconds": time.perf_counter() - t0}]
    print(rows[-1], flush=True)

    t2i(0)  # warm-up
    lat = [t2i(s) for s in range(1, 4)]
    rows.append({"row": "t2i512_serve", "seconds": statistics.median(lat), "all": lat})
    print(rows[-1], flush=True)
    lat = [t2i(s, PROMPT + " Seen from afar." * (s + 1)) for s in range(3)]
    rows.append({"row": "t2i512_serve_new_lengths", "seconds": statistics.median(lat), "all": lat})
    print(rows[-1], flush=True)

    with ThreadPoolExecutor(8) as pool:
        t0 = time.perf_counter()
        lat8 = list(pool.map(t2i, range(100, 116)))
        wall = time.perf_counter() - t0
    rows.append({"row": "t2i512_8clients", "seconds": wall, "images_per_s": 16 / wall, "median_latency": statistics.median(lat8),
                 "dit_max_batch_size": args.dit_max_batch_size})
    print(rows[-1], flush=True)

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(buf, format="PNG")
    edit(0, buf.getvalue())
    lat = [edit(s, buf.getvalue()) for s in range(1, 4)]
    rows.append({"row": "edit512_serve", "seconds": statistics.median(lat), "all": lat})
    print(rows[-1], flush=True)

    chat(0)
    one = [chat(i) for i in range(1, 4)]
    rates = [toks / secs for secs, toks in one]
    secs, toks = one[rates.index(statistics.median(rates))]
    rows.append({"row": "decode_b1_serve", "seconds": secs, "tokens": toks, "tok_per_s": toks / secs, "all_tok_per_s": rates})
    print(rows[-1], flush=True)
    bursts = []  # (wall, tokens) of each burst of 32 streams; the row is the median burst
    for burst in range(3):
        with ThreadPoolExecutor(32) as pool:
            t0 = time.perf_counter()
            out = list(pool.map(chat, range(100 * (burst + 1), 100 * (burst + 1) + 32)))
            bursts.append((time.perf_counter() - t0, sum(n for _, n in out)))
    rates = [toks / wall for wall, toks in bursts]
    wall, toks = bursts[rates.index(statistics.median(rates))]
    rows.append({"row": "decode_32streams_serve", "seconds": wall, "tokens": toks, "tok_per_s": toks / wall,
                 "all_tok_per_s": rates})
    print(rows[-1], flush=True)

    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=2)
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
