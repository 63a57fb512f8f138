"""What a new sequence length costs an attention call, per kernel choice (`bagel_ray.model.attention`).

    python -m benchmarks.bench_attention_plans [--json FILE] [--smoke]

For each shape the engines run (a DiT branch at 512² and 1024², a prompt prefill, twelve
prompts prefilled together, a prompt after an image's context), two calls of `attend`:
`default` (the mask spelled out, PyTorch's kernel choice: cuDNN on an H100) and `flash=True`
(the flash kernel where it applies). Reported: the steady time of a call (CUDA events, after
warm-up) and the first call's wall time at three lengths not seen before in this process,
after a warm-up at another length: cuDNN builds a plan for each new shape. BAGEL-7B's heads
(28 query, 4 KV, 128 wide), bf16. `--smoke`: tiny heads in fp32 on the CPU, to check the script.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from bagel_ray.model.attention import attend
from benchmarks.bench_pipeline import loop_ms, timed

CASES = (  # name, batch, query rows, context rows before them, causal; a new length adds a context row (DiT) or a query row
    ("dit512_branch", 1, 1026, 42, False),
    ("dit1024_branch", 1, 4098, 42, False),
    ("prompt", 1, 42, 0, True),
    ("prompts_x12", 12, 42, 0, True),
    ("prompt_after_image", 1, 30, 1090, True),
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny heads in fp32 on the CPU, to check the script itself")
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    heads, kv_heads, dim = (4, 2, 16) if args.smoke else (28, 4, 128)
    scale = 16 if args.smoke else 1  # smoke: shapes 16x smaller

    def qkv(batch: int, num_q: int, num_k: int):
        q = torch.randn(batch, num_q, heads, dim, device=device, dtype=dtype).transpose(1, 2)  # the engines' layout
        k, v = (torch.randn(batch, num_k, kv_heads, dim, device=device, dtype=dtype).transpose(1, 2) for _ in range(2))
        return q, k, v

    rows = []
    for name, batch, num_q, context, causal in CASES:
        num_q, context = max(1, num_q // scale), context // scale
        grows_query = context == 0 or causal  # a prefill: a new prompt length; a DiT branch: a new context length
        for way, flash in (("default", False), ("flash", True)):
            def call(extra: int = 0):
                q, k, v = qkv(batch, num_q + extra * grows_query, num_q + context + extra)
                return lambda: attend(q, k, v, causal=causal, flash=flash)

            warm = timed(call(), 1)[0] * 1e3  # one call, its wall time
            firsts = [timed(call(extra), 1)[0] * 1e3 for extra in (1, 2, 3)]
            steady_ms = loop_ms(call(), 3 if args.smoke else 20, device, warm_up=1)[0]
            row = {"row": f"{name}_{way}", "steady_us": steady_ms * 1e3,
                   "new_length_first_call_ms": statistics.median(firsts), "all_first_calls_ms": firsts,
                   "warm_up_ms": warm}
            rows.append(row)
            print(row, flush=True)
    print("\n| shape | kernel | steady | first call at a new length |\n|---|---|---:|---:|")
    for row in rows:
        shape, _, way = row["row"].rpartition("_")
        print(f"| {shape} | {way} | {row['steady_us']:.0f} us | {row['new_length_first_call_ms']:.1f} ms |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device if args.smoke else torch.cuda.get_device_name(), "torch": torch.__version__,
                       "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
