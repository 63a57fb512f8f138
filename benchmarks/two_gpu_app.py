"""The Serve app on a two-GPU machine, through each KV transport: its image outputs must equal
`LocalPipeline`'s bit for bit, and the contexts must take the route the transport promises.

    python3 -m benchmarks.two_gpu_app [--transports object_store,cuda_ipc,nccl,auto]

The tiny random model (`model: tiny`) in bfloat16 on CUDA, img2img contexts built on the
Thinker so that both modalities cross the handoff. Two layouts:

- split:  Thinker on one GPU, DiT on the other (`num_gpus: 1` each): object_store, nccl and
  auto go through their routes (auto takes NCCL); cuda_ipc cannot see the other GPU (Ray
  gives each replica only its own) and must fall back to the object store (`fetch`).
- shared: both replicas on one GPU (`num_gpus: 0.5` each): cuda_ipc and auto map the
  Thinker's memory; nccl cannot join a GPU to itself and falls back (`fetch`).

Requests: text2img, text2img with think (cfg_img a shorter cut), img2img. The reference runs
in this process on cuda:0. One line per check, `PASS` or `FAIL`; the exit status is the
number of failures.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from PIL import Image

from bagel_ray.engine.pipeline import LocalPipeline
from bagel_ray.engine.request import GenerationRequest

# (layout, transport) -> the route its handoffs must take
EXPECTED = {
    ("split", "object_store"): "object_store",
    ("split", "nccl"): "nccl",
    ("split", "auto"): "nccl",
    ("split", "cuda_ipc"): "fetch",
    ("shared", "object_store"): "object_store",
    ("shared", "cuda_ipc"): "cuda_ipc",
    ("shared", "auto"): "cuda_ipc",
    ("shared", "nccl"): "fetch",
}
GPU_SHARE = {"split": 1.0, "shared": 0.5}


def requests_to_check() -> dict[str, GenerationRequest]:
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    return {
        "text2img": GenerationRequest("text2img", "A red fox sleeps under an old oak tree.", seed=7, num_inference_steps=5,
                                      height=64, width=64, cfg_img_scale=1.5),
        "text2img think": GenerationRequest("text2img", "a castle", think=True, max_think_tokens=5, seed=2, num_inference_steps=4,
                                            height=32, width=32),
        "img2img": GenerationRequest("img2img", "Make it night.", image=picture, seed=21, num_inference_steps=5),
    }


def app_args(transport: str, share: float) -> dict:
    stage = {"num_replicas": 1, "device": "cuda", "dtype": "bfloat16", "gpu_memory_utilization": 0.45,
             "ray_actor_options": {"num_cpus": 1, "num_gpus": share}}
    return {"model": "tiny", "edit_contexts_on": "thinker", "request_timeout_s": 300,
            "ingress": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}},
            "thinker": dict(stage), "dit": dict(stage, transport=transport)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transports", default="object_store,cuda_ipc,nccl,auto")
    ap.add_argument("--layouts", default="split,shared")
    args = ap.parse_args(argv)
    if torch.cuda.device_count() < 2:
        sys.exit("two_gpu_app needs two GPUs")

    import ray
    from ray import serve

    from bagel_ray.serve.app import build_app

    reqs = requests_to_check()
    reference = LocalPipeline.from_pretrained("tiny", device="cuda", dtype="bfloat16")  # made (and cached) here first
    want = {name: reference.run(req).latent_tokens.cpu() for name, req in reqs.items()}
    del reference
    torch.cuda.empty_cache()

    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8011})
    failures = 0
    for layout in args.layouts.split(","):
        for transport in args.transports.split(","):
            route = EXPECTED[(layout, transport)]
            name = f"kv-{layout}-{transport}"
            t0 = time.perf_counter()
            handle = serve.run(build_app(app_args(transport, GPU_SHARE[layout])), name=name, route_prefix=f"/{name}")
            print(f"# {layout}: {transport} deployed in {time.perf_counter() - t0:.0f}s", flush=True)
            try:
                for req_name, req in reqs.items():
                    try:
                        got = handle.generate.remote(req).result(timeout_s=300)
                        same = torch.equal(got.latent_tokens.cpu(), want[req_name])
                        taken = [k.removeprefix("handoff_via_") for k in got.timings if k.startswith("handoff_via_")]
                        ok = same and taken == [route]
                        detail = (f"latents {'identical' if same else 'DIFFER'}, via {','.join(taken) or '?'} "
                                  f"(expected {route}), {got.timings.get('handoff_bytes', 0):.0f} bytes in "
                                  f"{got.timings.get('handoff_receive_s', 0) * 1e3:.2f} ms")
                    except Exception as exc:  # noqa: BLE001 - every failure is a FAIL line
                        ok, detail = False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    failures += not ok
                    print(f"{'PASS' if ok else 'FAIL'} {layout:6s} {transport:12s} {req_name:15s} {detail}", flush=True)
            finally:
                serve.delete(name)
                time.sleep(2.0)  # the replicas give their GPUs back before the next app asks
    serve.shutdown()
    ray.shutdown()
    print(f"{failures} failure(s)")
    return failures


if __name__ == "__main__":
    sys.exit(main())
