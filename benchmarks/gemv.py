"""The one-row projections of decoding (batch 1) on the 7B shapes: cuBLAS (F.linear) against the
Triton GEMV of `bagel_ray.model.kernels`, with the weights streamed from GPU memory (enough
copies rotate through a CUDA graph that none stays in the L2 cache, as in a decode step).

    python -m benchmarks.gemv [--sweep]

`--sweep` also times other block sizes of the kernel (how its configuration was chosen).
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from bagel_ray.model import kernels
from bagel_ray.model.kernels.gemv import _gemv, _gemv_kernel
from bagel_ray.model.kernels.silu_mul import silu_mul

# name: (out features, in features, bias, input is a gate/up row whose SiLU-mul is taken)
SHAPES = {"qkv_proj": (4608, 3584, True, False), "o_proj": (3584, 3584, False, False),
          "gate_up_proj": (37888, 3584, False, False), "down_proj (SiLU-mul fused)": (3584, 18944, False, True),
          "lm_head": (152064, 3584, False, False)}


def per_call_us(calls: list, reps: int = 5) -> float:
    """Mean time of one call in `calls`, replayed as one CUDA graph."""
    graph = torch.cuda.CUDAGraph()
    for call in calls:  # warm-up (and Triton's compile) outside the capture
        call()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / len(calls) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available() or kernels.triton is None:
        raise SystemExit("needs a CUDA GPU and Triton")
    triton = kernels.triton
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print("| projection | weights | cuBLAS | Triton GEMV | speed-up |\n|---|---:|---:|---:|---:|")
    for name, (n, k, has_bias, silu) in SHAPES.items():
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
                   for _ in range(max(2, int(600e6 // (n * k * 2))))]
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) if has_bias else None
        x = torch.randn(2 * k if silu else k, device="cuda", dtype=torch.bfloat16)
        dense_in = silu_mul(x[None]) if silu else x[None]
        cublas = per_call_us([lambda w=w: F.linear(dense_in, w, bias) for w in weights])
        gemv = per_call_us([lambda w=w: _gemv(x, w, bias, silu) for w in weights])
        gb = n * k * 2 / 1e9
        print(f"| {name} | {gb * 1e3:.0f} MB | {cublas:.1f} us, {gb / cublas * 1e3:.2f} TB/s | "
              f"{gemv:.1f} us, {gb / gemv * 1e3:.2f} TB/s | x{cublas / gemv:.2f} |", flush=True)
        if args.sweep:
            y = torch.empty(n, device="cuda", dtype=torch.bfloat16)
            found = []
            for block_n, block_k, warps, stages in itertools.product((4, 8, 16), (512, 1024), (4, 8), (2, 3, 4)):
                def call(w, block_n=block_n, block_k=block_k, warps=warps, stages=stages):
                    _gemv_kernel[(triton.cdiv(n, block_n),)](
                        x, w, bias if bias is not None else w, y, n, k, HAS_BIAS=bias is not None, SILU_MUL=silu,
                        BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, num_warps=warps)
                found.append((per_call_us([lambda w=w: call(w) for w in weights]), block_n, block_k, warps, stages))
            best = ", ".join(f"{us:.1f} us (BLOCK_N {bn}, BLOCK_K {bk}, {nw} warps, {st} stages)"
                             for us, bn, bk, nw, st in sorted(found)[:3])
            print(f"|   fastest: {best} | | | | |", flush=True)


if __name__ == "__main__":
    main()
