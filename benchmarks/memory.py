"""Memory check of the loader at full size: parameters and bf16 bytes per stage of
BAGEL-7B-MoT, counted from the official checkpoint layout and from the module tree built on
the meta device (the two must agree). Nothing is downloaded or allocated.

    python -m benchmarks.memory   (from the repository root)
"""

from __future__ import annotations

import math

import torch

from bagel_ray.model.bagel import ALL_PARTS, DIT_PARTS, THINKER_PARTS, BagelModel
from bagel_ray.model.config import BagelConfig
from bagel_ray.model.layout import checkpoint_layout, param_target, stage_bytes

GB = 1e9
PART_NAMES = {
    "und": "und expert + embed_tokens + norm",
    "lm_head": "lm_head",
    "gen": "gen expert (*_moe_gen)",
    "gen_heads": "time_embedder, vae2llm, llm2vae, latent_pos_embed",
    "vit": "SigLIP ViT + connector + vit_pos_embed",
}
STAGES = {"Thinker": THINKER_PARTS, "DiT": DIT_PARTS, "all (one process)": ALL_PARTS}


def meta_params(cfg: BagelConfig, parts: frozenset[str]) -> int:
    with torch.device("meta"):
        model = BagelModel(cfg, parts - {"vae"})
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    cfg = BagelConfig()
    layout = checkpoint_layout(cfg)
    per_part: dict[str, int] = {}
    for key, shape in layout.items():
        part = param_target(key).part
        per_part[part] = per_part.get(part, 0) + math.prod(shape)

    print(f"BAGEL-7B-MoT ema.safetensors: {len(layout)} tensors, {sum(per_part.values()):,} parameters\n")
    print(f"| {'part':<9} | {'contents':<52} | {'parameters':>15} | {'bf16 GB':>7} |")
    print(f"|{'-' * 11}|{'-' * 54}|{'-' * 16}:|{'-' * 8}:|")
    for part, name in PART_NAMES.items():
        print(f"| {part:<9} | {name:<52} | {per_part[part]:>15,} | {2 * per_part[part] / GB:>7.2f} |")

    print(f"\n| {'stage':<17} | {'parts':<38} | {'parameters':>15} | {'bf16 GB':>7} | {'meta-device params':>18} |")
    print(f"|{'-' * 19}|{'-' * 40}|{'-' * 16}:|{'-' * 8}:|{'-' * 19}:|")
    for stage, parts in STAGES.items():
        nbytes = stage_bytes(cfg, parts)
        on_meta = meta_params(cfg, parts)
        assert on_meta == nbytes // 2, (stage, on_meta, nbytes // 2)
        print(f"| {stage:<17} | {', '.join(sorted(parts)):<38} | {nbytes // 2:>15,} | {nbytes / GB:>7.2f} | {on_meta:>18,} |")
    print("\n(VAE ae.safetensors not included: 83,819,683 parameters, 0.34 GB in fp32, loaded by stages with 'vae'.)")


if __name__ == "__main__":
    main()
