"""The random-checkpoint writer: what it streams loads through the real loader (tiny config),
and at full size it plans the official file set and tensor table without writing 29 GB."""

from __future__ import annotations

import json
import math
import struct
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bagel_ray.model.bagel import ALL_PARTS
from bagel_ray.model.config import BagelConfig, read_bagel_config
from bagel_ray.model.layout import AE_FILE, EMA_FILE, checkpoint_layout
from bagel_ray.model.loader import load_checkpoint
from bagel_ray.model.random_checkpoint import (
    LM_HEAD,
    ema_layout,
    random_ema,
    safetensors_header,
    write_random_checkpoint,
    write_safetensors,
    write_tokenizer_and_configs,
)
from bagel_ray.model.tiny import TINY_CONFIG
from bagel_ray.model.tokenizer import BagelTokenizer

FULL = BagelConfig()
FULL_EMA_BYTES = 29_214_520_256  # 14,607,260,128 bf16 parameters (spec 2.2)
# What the official code reads (spec 1.1), plus the hub's config.json.
OFFICIAL_FILES = {"ema.safetensors", "ae.safetensors", "llm_config.json", "vit_config.json", "vocab.json", "merges.txt",
                  "tokenizer.json", "tokenizer_config.json", "config.json"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("random-tiny"), TINY_CONFIG, seed=5)


def test_tiny_loads_with_the_real_loader(tiny):
    ckpt = load_checkpoint(tiny, ALL_PARTS, dtype=torch.float32)
    assert ckpt.config == TINY_CONFIG
    assert ckpt.vae is not None
    assert ckpt.tokenizer.vocab_len <= TINY_CONFIG.llm.vocab_size
    ema = load_file(str(tiny / EMA_FILE))
    assert {k: tuple(v.shape) for k, v in ema.items()} == checkpoint_layout(TINY_CONFIG)
    assert {v.dtype for v in ema.values()} == {torch.bfloat16}
    assert torch.equal(ckpt.model.language_model.lm_head.weight, ema[LM_HEAD].float())
    assert sorted(p.name for p in tiny.iterdir()) == sorted(OFFICIAL_FILES | {"ae_config.json", "image_transforms.json"})


def test_streamed_file_holds_the_drawn_tensors(tiny):
    """Every tensor lands at its header offsets: the file reads back as what was drawn."""
    tokenizer = BagelTokenizer.from_folder(tiny)
    drawn = dict(random_ema(TINY_CONFIG, tokenizer, torch.Generator().manual_seed(5)))
    ema = load_file(str(tiny / EMA_FILE))
    assert ema.keys() == drawn.keys()
    assert all(torch.equal(ema[k], drawn[k]) for k in drawn)
    head = ema[LM_HEAD]
    assert head[tokenizer.eos_id].abs().sum() > 0
    assert head[1000:tokenizer.eos_id].abs().sum() == 0 and head[tokenizer.eos_id + 1:].abs().sum() == 0


def test_same_seed_same_bytes(tiny, tmp_path):
    again = write_random_checkpoint(tmp_path / "again", TINY_CONFIG, seed=5)
    for name in (EMA_FILE, AE_FILE, "tokenizer.json", "llm_config.json"):
        assert (again / name).read_bytes() == (tiny / name).read_bytes(), name
    other = write_random_checkpoint(tmp_path / "other", TINY_CONFIG, seed=6)
    assert (other / EMA_FILE).read_bytes() != (tiny / EMA_FILE).read_bytes()


def test_writer_streams_one_tensor_at_a_time(tmp_path):
    """The writer drops each tensor before asking for the next, so a source that draws them
    one by one never has two alive (reference counting frees them at once)."""
    layout = ema_layout(TINY_CONFIG)
    alive: list[weakref.ref] = []

    def source():
        for key, shape in layout.items():
            assert all(ref() is None for ref in alive), f"a tensor before {key!r} is still alive"
            tensor = torch.zeros(shape, dtype=torch.bfloat16)
            alive.append(weakref.ref(tensor))
            yield key, tensor
            del tensor

    write_safetensors(tmp_path / "x.safetensors", layout, source())
    assert len(alive) == len(layout)


@pytest.mark.parametrize("damage", ["order", "shape", "dtype", "short"])
def test_writer_rejects_a_source_off_the_layout(tmp_path, damage):
    layout = {"a": (2, 3), "b": (4,)}
    tensors = {"a": torch.zeros(2, 3, dtype=torch.bfloat16), "b": torch.ones(4, dtype=torch.bfloat16)}
    items = list(tensors.items())
    if damage == "order":
        items.reverse()
    elif damage == "shape":
        items[1] = ("b", torch.ones(5, dtype=torch.bfloat16))
    elif damage == "dtype":
        items[1] = ("b", torch.ones(4))
    else:
        items.pop()
    path = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="'[ab]'"):
        write_safetensors(path, layout, iter(items))
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left


# -- full size, without the 29 GB -----------------------------------------------------------------


def test_full_size_tensor_table():
    layout = ema_layout(FULL)
    assert layout == checkpoint_layout(FULL)  # same entries (dict equality ignores order)
    assert len(layout) == 1223 and list(layout)[-1] == LM_HEAD
    header = safetensors_header(layout, torch.bfloat16)
    (length,) = struct.unpack("<Q", header[:8])
    assert length == len(header) - 8 and len(header) % 8 == 0
    entries = json.loads(header[8:])
    assert entries.pop("__metadata__") == {"format": "pt"}
    assert list(entries) == list(layout)
    end = 0
    for key, entry in entries.items():
        assert entry["dtype"] == "BF16" and tuple(entry["shape"]) == layout[key]
        assert entry["data_offsets"] == [end, end + 2 * math.prod(layout[key])]
        end = entry["data_offsets"][1]
    assert end == FULL_EMA_BYTES


def test_full_size_config_files_and_tokenizer(tmp_path):
    """The full-size folder is the official file set (no tiny extras), its configs parse back to
    the official config, and the tokenizer's ids index rows of the 152,064-row table."""
    tokenizer = write_tokenizer_and_configs(tmp_path, FULL)
    assert {p.name for p in tmp_path.iterdir()} == OFFICIAL_FILES - {EMA_FILE, AE_FILE}
    assert read_bagel_config(tmp_path, max_latent_size=64, vit_max_num_patch_per_side=70) == FULL
    assert json.loads((tmp_path / "config.json").read_text())["max_latent_size"] == 32  # stale, as on the hub
    assert tokenizer.vocab_len == 1022 <= FULL.llm.vocab_size
    assert max(tokenizer.new_token_ids.values()) < tokenizer.vocab_len
