"""Single-GPU benchmark of the engines at full size (random bf16 weights), one request at a time.

    python -m benchmarks.bench_pipeline [--rows gemm,forward,guard,t2i512,t2i1024,edit512,edit1024,decode,dit_batch,taylorseer]
                                        [--reps N] [--json FILE] [--smoke]

Rows (issue targets in brackets):
  gemm      bf16 8192^3 matmul: the GEMM ceiling measured in the same run
  forward   one 1024^2 DiT forward (4098 query tokens, one branch) [>= 70% of gemm]
  t2i512    text2img 512^2, 20 steps, cfg_text 4, cfg_img 1.5 [<= 1.0 s through Serve]
  t2i1024   text2img 1024^2, 50 steps, notebook settings [<= 9.0 s]
  edit512   img2img 512^2 input, 20 steps, edit defaults [<= 1.5 s]
  edit1024  img2img 1024^2 input, 50 steps, edit defaults [<= 16 s]
  decode    Thinker greedy decode, batch 1 and 32, after a warm-up call [>= 180 tok/s, >= 2500 tok/s]
  decode_cli text2text at batch 1 through the CLI's path (`LocalPipeline.run`, 128 new tokens) on a
            Thinker made in the row: the seconds to make it (its decoder is set up with it), the first
            call's tok/s, the median of the later calls, and tok/s over all calls, the first
            included [>= 180 tok/s]. Run it alone (`--rows decode_cli`) for a process's first decode.
  dit_batch text2img 512^2 / 20 steps, cfg 4 / 1.5: 8 requests one after the other against 4
            and 8 stepped together (`DiT.step`, cross-request batching), images/s and the
            largest |batched - alone| latent difference
  dit_graphs text2img and img2img 512^2 with the DiT's layer graphs off and on, alternated in this
            process (median of --reps each), and the largest latent difference between the two
  taylorseer the official TaylorSeer step cache (issue 20) against the exact path in the same run, for
            t2i1024, t2i512 and edit512 [<= 3.8 s, <= 0.5 s, <= 0.9 s]: seconds of each, the network
            blocks each ran (full forwards against every branch forward), the floor (the exact time
            with its denoising scaled by that ratio), and the relative L2 distance of the final
            latents from the exact ones (same seed; random weights: a stability figure, not quality)
  guard     the fused kernels and graphs against the eager reference ops: latent and pixel
            differences of a 512^2 text2img; 32 greedy tokens: where the ids first differ, the
            eager path's margin between the two choices there, and the paths' largest logit gap
Every timed region ends with a device synchronize; the median of --reps runs is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from bagel_ray.engine.dit import DiT
from bagel_ray.engine.kv_context import ImageContexts
from bagel_ray.engine.pipeline import LocalPipeline
from bagel_ray.engine.request import GenerationRequest
from bagel_ray.engine.decoder import DecodeParams
from bagel_ray.engine.thinker import Thinker
from bagel_ray.model import kernels
from bagel_ray.model.config import BagelConfig
from bagel_ray.model.random_init import random_model, random_vae, tokenizer
from benchmarks.table import print_table

PROMPT = "A photo of a red fox sleeping under an old oak tree in autumn, soft morning light, shallow depth of field."
EDIT_PROMPT = "Make the sky purple and add a few stars."


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, reps: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def loop_ms(fn, reps: int, device: str, warm_up: int = 3) -> tuple[float, float, float]:
    """(ms a call, wall-clock start, end) of `reps` back-to-back calls after `warm_up` calls:
    timed by CUDA events on the GPU (no host sync between calls), by the host clock on the CPU."""
    for _ in range(warm_up):
        fn()
    if device != "cuda":
        t0 = time.time()
        for _ in range(reps):
            fn()
        return (time.time() - t0) / reps * 1e3, t0, time.time()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.time()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps, t0, time.time()


def forward_flops(cfg: BagelConfig, n_query: int, n_context: int) -> float:
    llm = cfg.llm
    d, kv = llm.hidden_size, llm.num_key_value_heads * llm.head_dim
    per_token = 2 * (2 * d * d + 2 * d * kv + 3 * d * llm.intermediate_size) * llm.num_hidden_layers
    attention = 4 * d * (n_context + n_query) * n_query * llm.num_hidden_layers
    return per_token * n_query + attention


def gemm_row(reps: int) -> dict:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    seconds, _ = timed(lambda: [a @ b for _ in range(10)], reps)
    return {"row": "gemm", "seconds": seconds / 10, "tflops": 2 * 8192**3 / (seconds / 10) / 1e12}


def random_pipeline(smoke: bool) -> LocalPipeline:
    """The pipeline the engine benchmarks time: full-size random bf16 weights on the GPU, or with
    `smoke` the tiny config in fp32 on the CPU (to check a script itself)."""
    from bagel_ray.model.tiny import TINY_CONFIG

    device = "cpu" if smoke else "cuda"
    cfg = TINY_CONFIG if smoke else BagelConfig()
    model = random_model(device=device, dtype=torch.float32 if smoke else torch.bfloat16, cfg=cfg)
    vae = random_vae(cfg, device=device)
    tok = tokenizer()
    return LocalPipeline(Thinker(model, tok, vae), DiT(model, tok, vae))


def decode_cli_row(pipe: LocalPipeline, reps: int, max_tokens: int = 128) -> dict:
    """Text decoding at batch 1 as `bagel-ray generate --modality text2text` runs it, on a new
    Thinker over the pipeline's weights, first call included (see the module docstring)."""
    th = pipe.thinker
    sync()
    t0 = time.perf_counter()
    cli = LocalPipeline(Thinker(th.model, th.tokenizer), None)
    sync()
    setup_s = time.perf_counter() - t0
    req = GenerationRequest("text2text", PROMPT, max_tokens=max_tokens)
    calls = []
    for _ in range(reps + 1):
        sync()
        t0 = time.perf_counter()
        timings = cli.run(req).timings
        sync()
        calls.append((time.perf_counter() - t0, timings["decode_s"], timings["tokens"]))
    rate = [tokens / decode_s for _, decode_s, tokens in calls]
    return {"row": "decode_cli_b1", "seconds": calls[0][0], "setup_s": setup_s, "first_tok_per_s": rate[0],
            "steady_tok_per_s": statistics.median(rate[1:]),
            "tok_per_s": sum(c[2] for c in calls) / sum(c[1] for c in calls), "tokens": calls[0][2]}


def image(side: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8))


def taylorseer_row(pipe: LocalPipeline, name: str, req: GenerationRequest, reps: int) -> dict:
    """One case exact and with the step cache, alternated in this process (median of `reps` each)."""
    cached_req = replace(req, taylorseer=True)
    for warm in (req, cached_req):  # warm-up at this size; 8 steps reach the cache's 1-block full forwards
        pipe.run(replace(warm, num_inference_steps=8))
    runs: dict[bool, list[float]] = {False: [], True: []}
    out, blocks = {}, {}
    for _ in range(reps):
        for cached in (False, True):
            ran: list[int] = []
            seconds, out[cached] = timed(lambda: pipe.run(cached_req if cached else req, lambda r: ran.append(len(r.forwards))), 1)
            runs[cached].append(seconds)
            blocks[cached] = sum(ran)
    exact_s, cached_s = statistics.median(runs[False]), statistics.median(runs[True])
    denoise_s = out[False].timings["denoise_s"]
    a, b = out[True].latent_tokens.float(), out[False].latent_tokens.float()
    return {"row": f"taylorseer_{name}", "seconds": cached_s, "exact_seconds": exact_s, "speedup": exact_s / cached_s,
            "full_forwards": blocks[True], "exact_forwards": blocks[False],
            "floor_seconds": exact_s - denoise_s * (1 - blocks[True] / blocks[False]),
            "latent_rel_l2": float((a - b).norm() / b.norm())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="gemm,forward,guard,t2i512,t2i1024,edit512,edit1024,decode,decode_cli,dit_batch,"
                                          "dit_graphs,taylorseer")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true", help="the tiny config on the CPU, to check the script itself")
    args = parser.parse_args()
    dev = "cpu" if args.smoke else "cuda"
    big, small = (128, 64) if args.smoke else (1024, 512)
    rows = args.rows.split(",")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    results = []
    device = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name()
    print(f"device: {device}, torch {torch.__version__}", flush=True)
    if "gemm" in rows and not args.smoke:
        results.append(gemm_row(args.reps))
        print(results[-1], flush=True)
    t0 = time.perf_counter()
    pipe = random_pipeline(args.smoke)
    cfg = pipe.cfg
    print(f"model built in {time.perf_counter() - t0:.1f}s", flush=True)

    if "forward" in rows:
        th = pipe.thinker
        ctx = th.append_text(th.empty(), PROMPT)
        dit = pipe.dit
        contexts = ImageContexts(ctx, ctx.cut, ctx.cut, big, big)
        noise = dit.initial_noise(big, big, torch.Generator().manual_seed(0)).to(dev)
        g = big // cfg.latent_downsample
        pos = torch.arange(g * g, device=dev)
        pos = (pos // g) * cfg.max_latent_size + pos % g
        t = torch.tensor(0.5)
        dit.velocities(noise, t, [contexts.gen], pos)
        seconds, _ = timed(lambda: dit.velocities(noise, t, [contexts.gen], pos), args.reps * 2)
        flops = forward_flops(cfg, g * g + 2, ctx.length)
        results.append({"row": "forward", "seconds": seconds, "tflops": flops / seconds / 1e12, "flop": flops})
        print(results[-1], flush=True)

    cases = {
        "t2i512": GenerationRequest("text2img", PROMPT, height=small, width=small, num_inference_steps=20, cfg_img_scale=1.5),
        "t2i1024": GenerationRequest("text2img", PROMPT, height=big, width=big, num_inference_steps=50),
        "edit512": GenerationRequest("img2img", EDIT_PROMPT, image=image(small), num_inference_steps=20),
        "edit1024": GenerationRequest("img2img", EDIT_PROMPT, image=image(big), num_inference_steps=50),
    }
    for name, req in cases.items():
        if name not in rows:
            continue
        pipe.run(GenerationRequest(**{**req.__dict__, "num_inference_steps": 3}))  # warm-up at this size
        seconds, result = timed(lambda: pipe.run(req), args.reps)
        results.append({"row": name, "seconds": seconds, **{k: round(v, 4) for k, v in result.timings.items()}})
        print(results[-1], flush=True)

    if "taylorseer" in rows:
        for name in ("t2i1024", "t2i512", "edit512"):
            results.append(taylorseer_row(pipe, name, cases[name], args.reps))
            print(results[-1], flush=True)

    if "guard" in rows:
        # the fused path against the eager reference ops (same engines, same seed)
        req = GenerationRequest("text2img", PROMPT, height=small, width=small, num_inference_steps=12, cfg_img_scale=1.5, seed=3)
        fused = pipe.run(req)
        with kernels.eager():
            plain = pipe.run(req)
            # the floor: how far the same eager path moves when its initial noise moves by
            # one bf16 rounding (what any reordering of bf16 sums does to the trajectory)
            noise = pipe.prepare_image(req).noise
            nudged = pipe.run(GenerationRequest(**{**req.__dict__, "init_noise": noise.bfloat16().float()}))
        a, b = fused.latent_tokens.float(), plain.latent_tokens.float()
        floor = float((nudged.latent_tokens.float() - b).norm() / b.norm())
        pixels = np.abs(np.asarray(fused.image, dtype=np.int16) - np.asarray(plain.image, dtype=np.int16))
        th = pipe.thinker
        ctx = [th.append_text(th.empty(), PROMPT)]
        fast = th.decode(ctx, DecodeParams(max_new_tokens=32), keep_logits=True)[0]
        th.cuda_graphs = False
        with kernels.eager():
            slow = th.decode(ctx, DecodeParams(max_new_tokens=32), keep_logits=True)[0]
        th.cuda_graphs = True
        graphed, eager_ids = fast.token_ids, slow.token_ids
        first_diff = next((i for i, (p, q) in enumerate(zip(graphed, eager_ids)) if p != q), None)
        # over the steps both paths ran on the same tokens: how far their logits are apart, and
        # (at a first differing token) how close the eager path's choice was to the fused one's
        same = len(graphed) if first_diff is None else first_diff + 1
        logit_diff = float((fast.logits[:same] - slow.logits[:same]).abs().max())
        margin = None if first_diff is None else float(slow.logits[first_diff, eager_ids[first_diff]]
                                                       - slow.logits[first_diff, graphed[first_diff]])
        results.append({"row": "guard", "seconds": 0.0, "latent_rel_l2": float((a - b).norm() / b.norm()), "floor_rel_l2": floor,
                        "latent_max_abs": float((a - b).abs().max()), "pixel_max": int(pixels.max()),
                        "pixel_mean": float(pixels.mean()), "decode_same_ids": graphed == eager_ids,
                        "decode_first_diff": first_diff, "decode_logit_max_diff": logit_diff, "decode_flip_margin": margin})
        print(results[-1], flush=True)

    if "vae_bf16" in rows:
        # the VAE in bf16 against the fp32 one, on the same latents (a lever of issue 6)
        dit = pipe.dit
        tokens = torch.randn((big // 16) ** 2, 64, device=dev, generator=torch.Generator(device=dev).manual_seed(5))
        fp32_s, (raw32, img32) = timed(lambda: dit.decode_image(tokens, big, big), args.reps)
        dit.vae = dit.vae.to(torch.bfloat16)
        bf16_s, (raw16, img16) = timed(lambda: dit.decode_image(tokens, big, big), args.reps)
        dit.vae = dit.vae.to(torch.float32)
        pixels = np.abs(np.asarray(img32, dtype=np.int16) - np.asarray(img16, dtype=np.int16))
        results.append({"row": "vae_bf16", "seconds": bf16_s, "fp32_seconds": fp32_s, "pixel_max": int(pixels.max()),
                        "pixel_mean": float(pixels.mean()), "raw_max_abs": float((raw32.float() - raw16.float()).abs().max())})
        print(results[-1], flush=True)

    if "dit_graphs" in rows:
        # the DiT's layer graphs (engine/dit_graphs.py) against its eager forward, same process
        for name in ("t2i512", "edit512"):
            req = cases[name]
            runs: dict[bool, list[float]] = {False: [], True: []}
            latents = {}
            for graphs in (False, True):  # warm-up, and the graphs' capture
                pipe.dit.cuda_graphs = graphs
                pipe.run(GenerationRequest(**{**req.__dict__, "num_inference_steps": 3}))
            for _ in range(args.reps):
                for graphs in (False, True):
                    pipe.dit.cuda_graphs = graphs
                    seconds, out = timed(lambda: pipe.run(req), 1)
                    runs[graphs].append(seconds)
                    latents[graphs] = out.latent_tokens.float()
            pipe.dit.cuda_graphs = True
            results.append({"row": f"dit_graphs_{name}", "seconds": statistics.median(runs[True]),
                            "eager_seconds": statistics.median(runs[False]),
                            "latent_max_abs_diff": float((latents[True] - latents[False]).abs().max())})
            print(results[-1], flush=True)

    if "dit_batch" in rows:
        th, dit = pipe.thinker, pipe.dit
        params = GenerationRequest("text2img", PROMPT, height=small, width=small, num_inference_steps=20, cfg_img_scale=1.5).sampler()
        prompts = [th.append_text(th.empty(), f"{PROMPT} ({i})") for i in range(8)]
        contexts = [ImageContexts(c, th.empty().cut, c.cut, small, small) for c in prompts]
        noises = [dit.initial_noise(small, small, torch.Generator().manual_seed(i)) for i in range(8)]

        def stepped(batch: int) -> list:
            jobs = [dit.job(c, params, n) for c, n in zip(contexts[:batch], noises[:batch])]
            while not all(j.done for j in jobs):
                dit.step(jobs)
            return [j.x for j in jobs]

        stepped(8)  # warm-up of the shapes
        alone_s, alone = timed(lambda: [dit.denoise(c, params, n) for c, n in zip(contexts, noises)], 1)
        row = {"row": "dit_batch", "seconds": alone_s, "alone_images_per_s": 8 / alone_s}
        for batch in (4, 8):
            seconds, xs = timed(lambda: stepped(batch), args.reps)
            row[f"batch{batch}_images_per_s"] = batch / seconds
            row[f"batch{batch}_max_abs_diff"] = max(float((x - a).abs().max()) for x, a in zip(xs, alone))
        results.append(row)
        print(results[-1], flush=True)

    if "decode" in rows:
        th = pipe.thinker
        for batch in (1, 32):
            contexts = [th.append_text(th.empty(), f"{PROMPT} ({i})") for i in range(batch)]
            params = DecodeParams(max_new_tokens=128)
            # random weights never predict <|im_end|> reliably; count what was generated
            th.decode(contexts, DecodeParams(max_new_tokens=4))
            seconds, outs = timed(lambda: th.decode(contexts, params), args.reps)
            tokens = sum(len(o.token_ids) for o in outs)
            results.append({"row": f"decode_b{batch}", "seconds": seconds, "tokens": tokens, "tok_per_s": tokens / seconds})
            print(results[-1], flush=True)

    if "decode_cli" in rows:
        results.append(decode_cli_row(pipe, args.reps))
        print(results[-1], flush=True)

    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "torch": torch.__version__, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
