"""Random BAGEL checkpoints in the official file layout, for any config.

One writer for the embedded tiny model (`bagel_ray.model.tiny`) and for full-size ones
(`bagel-ray make-random-model --size 7b DIR`: 29.2 GB, what the loader and `serve run` read
when no real weights are at hand). The folder holds what the official code needs
(`ema.safetensors`, `ae.safetensors`, `llm_config.json`, `vit_config.json`, the four tokenizer
files) plus the hub's `config.json`; a config whose VAE or image transforms differ from the
official ones also gets `ae_config.json` / `image_transforms.json`, the two extras the loader reads.

`ema.safetensors` is streamed: its header is computed from `checkpoint_layout`, then each tensor
is drawn, rounded to bf16 and appended on its own, so host memory holds at most the tensor
being drawn (in fp32 and bf16) and the bf16 `lm_head` kept for last: 3.3 GB at 7B, not 29.

The tokenizer is the tiny byte-level BPE of `tiny_tokenizer`: 1,000 BPE entries and the 22
Qwen2.5 added tokens, whose ids index the first rows of any embedding table (152,064 at 7B,
where the real tokenizer also leaves rows unused). Text from such a checkpoint is noise; the
bytes, shapes and speed are those of a real one.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from bagel_ray.atomic import temp_path
from bagel_ray.model.config import BagelConfig, VAEConfig
from bagel_ray.model.layout import AE_FILE, EMA_FILE, checkpoint_layout
from bagel_ray.model.tiny_tokenizer import write_tiny_tokenizer
from bagel_ray.model.tokenizer import BagelTokenizer
from bagel_ray.model.vae import AutoEncoder

BPE_TOKENS = 1000
LM_HEAD = "language_model.lm_head.weight"
_SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
_OFFICIAL = BagelConfig()


def sincos_table(grid: int, dim: int) -> torch.Tensor:
    """The 2-D sin-cos table of spec 5.5: row i*G+j is [S(j), S(i)], S(u) = [sin(u w), cos(u w)]."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)

    def s(u: torch.Tensor) -> torch.Tensor:
        angles = u[:, None] * omega[None]
        return torch.cat((angles.sin(), angles.cos()), dim=1)

    rows = coords.repeat_interleave(grid)
    cols = coords.repeat(grid)
    return torch.cat((s(cols), s(rows)), dim=1).float()


def random_tensor(key: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """One `ema.safetensors` tensor in fp32: the position tables as computed, norm weights near 1,
    biases small, matrices scaled by 1/sqrt(fan_in)."""
    if key.endswith("pos_embed"):
        return sincos_table(math.isqrt(shape[0]), shape[1])
    if len(shape) == 1 and "norm" in key and key.endswith("weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    if len(shape) == 1:
        return 0.02 * torch.randn(shape, generator=generator)
    return torch.randn(shape, generator=generator).div_(math.sqrt(shape[-1]))  # in place: one fp32 copy at a time


def ema_layout(cfg: BagelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of `ema.safetensors` in the order they are written: `checkpoint_layout`'s,
    with `lm_head` moved last (`random_ema` finishes it after every other draw)."""
    layout = checkpoint_layout(cfg)
    head = layout.pop(LM_HEAD)
    return layout | {LM_HEAD: head}


def random_ema(cfg: BagelConfig, tokenizer: BagelTokenizer, generator: torch.Generator) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, bf16 tensor) pairs in `ema_layout` order, drawn one at a time from `generator`.

    Greedy text stays printable: `lm_head` rows of ids the BPE does not cover (padding and the
    special tokens) are zero, except `<|im_end|>`, whose row is drawn after all the others."""
    head = None
    for key, shape in checkpoint_layout(cfg).items():
        tensor = random_tensor(key, shape, generator).to(torch.bfloat16)
        if key == LM_HEAD:
            head = tensor
        else:
            yield key, tensor
        del tensor  # not alive while the next one is drawn
    assert head is not None
    head[BPE_TOKENS:] = 0
    head[tokenizer.eos_id] = (torch.randn(head.shape[1], generator=generator) / math.sqrt(head.shape[1])).to(torch.bfloat16)
    yield LM_HEAD, head


def safetensors_header(layout: dict[str, tuple[int, ...]], dtype: torch.dtype) -> bytes:
    """The header of a safetensors file holding `layout`'s tensors back to back, in its order:
    the little-endian u64 length, then the JSON, padded with spaces to a multiple of 8 bytes."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    entries: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape in layout.items():
        end = offset + math.prod(shape) * itemsize
        entries[key] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(path: Path, layout: dict[str, tuple[int, ...]], tensors: Iterable[tuple[str, torch.Tensor]],
                      dtype: torch.dtype = torch.bfloat16) -> int:
    """Stream `tensors` (in `layout` order, of `dtype`) into a safetensors file, one at a time.

    Written to a hidden sibling, flushed to disk and renamed into place, so `path` exists only
    when whole. Returns the file's size in bytes."""
    path = Path(path)
    tmp = temp_path(path)
    expected = iter(layout.items())
    try:
        with open(tmp, "wb") as f:
            f.write(safetensors_header(layout, dtype))
            for key, tensor in tensors:
                want = next(expected, None)
                if want is None or want[0] != key or tuple(tensor.shape) != want[1] or tensor.dtype != dtype:
                    raise ValueError(f"{path.name}: got {key!r} {list(tensor.shape)} {tensor.dtype}, expected {want} {dtype}")
                f.write(tensor.contiguous().view(torch.uint8).numpy().data)
                del tensor  # the source may free it before drawing the next
            missing = next(expected, None)
            if missing is not None:
                raise ValueError(f"{path.name}: no tensor for {missing[0]!r}")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.stat().st_size


def config_files(cfg: BagelConfig, tokenizer: BagelTokenizer) -> dict[str, dict]:
    """The JSON files of the folder, by name."""
    llm, vit, vae = cfg.llm, cfg.vit, cfg.vae
    llm_json = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "hidden_size": llm.hidden_size, "intermediate_size": llm.intermediate_size,
        "num_hidden_layers": llm.num_hidden_layers, "num_attention_heads": llm.num_attention_heads,
        "num_key_value_heads": llm.num_key_value_heads, "vocab_size": llm.vocab_size,
        "rms_norm_eps": llm.rms_norm_eps, "rope_theta": llm.rope_theta, "rope_scaling": None,
        "max_position_embeddings": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": BPE_TOKENS, "eos_token_id": tokenizer.eos_id,
    }
    vit_json = {
        "model_type": "siglip_vision_model", "hidden_size": vit.hidden_size, "intermediate_size": vit.intermediate_size,
        "num_attention_heads": vit.num_attention_heads, "num_hidden_layers": vit.num_layers + 1,
        "patch_size": vit.patch_size, "image_size": cfg.vit_max_num_patch_per_side * vit.patch_size,
    }
    files = {
        "llm_config.json": llm_json,
        "vit_config.json": vit_json,
        # Like the hub's, this config.json is not read by the loader, and its max_latent_size
        # is stale on purpose (half the true value, as the real checkpoint's 32 for 64).
        "config.json": {
            "architectures": ["BagelForConditionalGeneration"], "model_type": "bagel",
            "llm_config": llm_json, "vit_config": vit_json,
            "vae_config": {"downsample": vae.downsample, "z_channels": vae.z_channels},
            "latent_patch_size": cfg.latent_patch_size, "max_latent_size": cfg.max_latent_size // 2,
            "vit_max_num_patch_per_side": cfg.vit_max_num_patch_per_side, "connector_act": "gelu_pytorch_tanh",
            "interpolate_pos": False, "timestep_shift": 1.0,
        },
    }
    if vae != VAEConfig():
        files["ae_config.json"] = {**asdict(vae), "ch_mult": list(vae.ch_mult)}
    if (cfg.vae_transform, cfg.vit_transform) != (_OFFICIAL.vae_transform, _OFFICIAL.vit_transform):
        files["image_transforms.json"] = {
            "vae": {"max_image_size": cfg.vae_transform.max_image_size, "min_image_size": cfg.vae_transform.min_image_size,
                    "image_stride": cfg.vae_transform.image_stride},
            "vit": {"max_image_size": cfg.vit_transform.max_image_size, "min_image_size": cfg.vit_transform.min_image_size,
                    "image_stride": cfg.vit_transform.image_stride},
            "official_defaults": {"vae": [1024, 512, 16], "vit": [980, 224, 14]},
        }
    return files


def write_tokenizer_and_configs(folder: Path, cfg: BagelConfig) -> BagelTokenizer:
    """Everything but the two safetensors files; returns the tokenizer written."""
    folder = Path(folder)
    write_tiny_tokenizer(folder, vocab_size=BPE_TOKENS)
    tokenizer = BagelTokenizer.from_folder(folder)
    if tokenizer.vocab_len > cfg.llm.vocab_size:
        raise ValueError(f"the tokenizer's {tokenizer.vocab_len} ids do not fit the {cfg.llm.vocab_size}-row embedding table")
    for name, data in config_files(cfg, tokenizer).items():
        (folder / name).write_text(json.dumps(data, indent=2) + "\n")
    return tokenizer


def write_random_checkpoint(folder: Path, cfg: BagelConfig, seed: int = 0) -> Path:
    """Write a random checkpoint of `cfg` into `folder` (created if needed); same tensors for a
    seed. `ema.safetensors` comes last and appears whole, so its presence means a complete folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = write_tokenizer_and_configs(folder, cfg)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = AutoEncoder(cfg.vae)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(folder / AE_FILE))
    del vae
    generator = torch.Generator().manual_seed(seed)
    write_safetensors(folder / EMA_FILE, ema_layout(cfg), random_ema(cfg, tokenizer, generator))
    return folder
