"""Which SDPA kernel serves the DiT's attention shapes, and how fast (GQA 28 query heads over
4 kv heads): enable_gqa against expanded K/V, per backend.

    python -m benchmarks.bench_attention
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.bench_pipeline import loop_ms


def main() -> None:
    for lq, lk in ((4098, 4120), (1026, 1050), (4098, 13100)):
        q = torch.randn(1, 28, lq, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 4, lk, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        flop = 4 * lq * lk * 28 * 128
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                              ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            for gqa in (True, False):
                def run():
                    if gqa:
                        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                    return F.scaled_dot_product_attention(q, k.repeat_interleave(7, 1), v.repeat_interleave(7, 1))
                try:
                    with sdpa_kernel(backend):
                        ms = loop_ms(run, 20, "cuda")[0]
                    print(f"Lq={lq} Lk={lk} {name:9s} gqa={gqa!s:5s} {ms:7.3f} ms  {flop / ms / 1e9:6.0f} TFLOP/s", flush=True)
                except RuntimeError as exc:
                    print(f"Lq={lq} Lk={lk} {name:9s} gqa={gqa!s:5s} unsupported: {str(exc).splitlines()[0][:80]}", flush=True)
        ms = loop_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), 20, "cuda")[0]
        print(f"Lq={lq} Lk={lk} default   gqa=True  {ms:7.3f} ms  {flop / ms / 1e9:6.0f} TFLOP/s", flush=True)


if __name__ == "__main__":
    main()
