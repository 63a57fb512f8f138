"""The checkpoint loader: per-stage parts, damaged checkpoints, the stale config, and the
full-size memory check (spec 1.5, 2.1, 2.2)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bagel_ray.model.bagel import ALL_PARTS, DIT_PARTS, THINKER_PARTS, BagelModel
from bagel_ray.model.config import BagelConfig
from bagel_ray.model.layout import EMA_FILE, CheckpointError, checkpoint_layout, param_target, stage_bytes
from bagel_ray.model.loader import load_model, read_config
from bagel_ray.model.tiny import make_tiny_model

FULL = BagelConfig()
UND_PARAMS = 7_615_623_680  # embed + lm_head + 28 und layers + norm (= Qwen2.5-7B)
EMBED_PARAMS = 544_997_376  # embed_tokens, and lm_head likewise
GEN_PARAMS = 6_525_628_928  # 28 x *_moe_gen + norm_moe_gen
VIT_PARAMS = 402_552_736
CONNECTOR_PARAMS = 16_980_992
VIT_POS_PARAMS = 17_561_600
GEN_HEAD_PARAMS = 13_769_728 + 232_960 + 229_440 + 14_680_064  # time_embedder, vae2llm, llm2vae, latent table
TOTAL_PARAMS = 14_607_260_128


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


def damaged_copy(tiny: Path, tmp_path: Path, edit) -> Path:
    """A copy of the tiny folder whose ema.safetensors went through `edit(dict)`."""
    folder = tmp_path / "damaged"
    shutil.copytree(tiny, folder)
    tensors = load_file(str(folder / EMA_FILE))
    edit(tensors)
    save_file(tensors, str(folder / EMA_FILE))
    return folder


# -- parts -------------------------------------------------------------------------------------


def test_thinker_never_allocates_the_gen_expert(tiny):
    model = load_model(tiny, THINKER_PARTS, dtype=torch.float32)
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if ".gen." in n]
    assert model.llm.norm_moe_gen is None
    assert all(layer.gen is None for layer in model.llm.layers)
    assert not hasattr(model, "time_embedder") and not hasattr(model, "latent_pos_embed")
    assert model.language_model.lm_head is not None
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    expected = sum(math.prod(s) for k, s in checkpoint_layout(model.cfg).items() if param_target(k).part in THINKER_PARTS)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_dit_has_no_lm_head(tiny):
    model = load_model(tiny, DIT_PARTS)
    assert model.language_model.lm_head is None
    assert not [n for n, _ in model.named_parameters() if "lm_head" in n]
    assert model.llm.norm_moe_gen is not None
    assert all(layer.gen is not None for layer in model.llm.layers)
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in model.parameters())
    with pytest.raises(RuntimeError, match="lm_head"):
        model.logits(torch.zeros(1, model.cfg.llm.hidden_size, dtype=torch.bfloat16))


def test_fused_params_hold_the_official_tensors(tiny):
    """q/k/v and gate/up land in their shards of the fused parameters, und and gen apart."""
    model = load_model(tiny, ALL_PARTS, dtype=torch.float32)
    ema = load_file(str(tiny / EMA_FILE))
    layer = model.llm.layers[1]
    p = "language_model.model.layers.1"
    for expert, g in ((layer.und, ""), (layer.gen, "_moe_gen")):
        qkv = torch.cat([ema[f"{p}.self_attn.{x}{g}.weight"] for x in ("q_proj", "k_proj", "v_proj")]).float()
        assert torch.equal(expert.qkv_proj.weight, qkv)
        mlp = "mlp_moe_gen" if g else "mlp"
        gate_up = torch.cat([ema[f"{p}.{mlp}.gate_proj.weight"], ema[f"{p}.{mlp}.up_proj.weight"]]).float()
        assert torch.equal(expert.gate_up_proj.weight, gate_up)
        assert torch.equal(expert.q_norm.weight, ema[f"{p}.self_attn.q_norm{g}.weight"].float())
    assert not torch.equal(layer.und.qkv_proj.weight, layer.gen.qkv_proj.weight)
    assert model.llm.inv_freq.dtype == torch.float32 and model.llm.inv_freq.device.type == "cpu"


# -- damaged checkpoints -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["language_model.model.layers.0.self_attn.k_proj.weight", "language_model.model.layers.1.mlp_moe_gen.up_proj.weight", "connector.fc2.bias"],
)
def test_missing_tensor(tiny, tmp_path, key):
    folder = damaged_copy(tiny, tmp_path, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_model(folder, ALL_PARTS)


def test_missing_tensor_of_an_unloaded_part_is_fine(tiny, tmp_path):
    """The Thinker reads no gen-expert tensor, so a checkpoint without one still loads for it."""
    folder = damaged_copy(tiny, tmp_path, lambda t: t.pop("language_model.model.layers.0.mlp_moe_gen.down_proj.weight"))
    load_model(folder, THINKER_PARTS)
    with pytest.raises(CheckpointError, match="mlp_moe_gen.down_proj"):
        load_model(folder, DIT_PARTS)


def test_wrong_shape(tiny, tmp_path):
    key = "language_model.model.layers.1.self_attn.v_proj.bias"

    def edit(t):
        t[key] = torch.zeros(t[key].shape[0] + 1, dtype=t[key].dtype)

    folder = damaged_copy(tiny, tmp_path, edit)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.") + r".*shape"):
        load_model(folder, ALL_PARTS)


@pytest.mark.parametrize(
    "key",
    ["language_model.model.layers.0.self_attn.extra_proj.weight", "language_model.model.layers.7.mlp.gate_proj.weight", "unknown_head.weight"],
)
def test_unexpected_tensor(tiny, tmp_path, key):
    def edit(t):
        t[key] = torch.zeros(4, dtype=torch.bfloat16)

    folder = damaged_copy(tiny, tmp_path, edit)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_model(folder, ALL_PARTS)


def test_unexpected_tensor_of_an_unloaded_part(tiny, tmp_path):
    """A malformed checkpoint is rejected by every stage, not only by the one reading that part."""
    key = "language_model.model.layers.7.mlp_moe_gen.gate_proj.weight"

    def edit(t):
        t[key] = torch.zeros(4, dtype=torch.bfloat16)

    folder = damaged_copy(tiny, tmp_path, edit)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_model(folder, THINKER_PARTS)


def test_missing_ema_file(tiny, tmp_path):
    folder = tmp_path / "no_ema"
    shutil.copytree(tiny, folder)
    (folder / EMA_FILE).unlink()
    with pytest.raises(CheckpointError, match=EMA_FILE):
        load_model(folder, ALL_PARTS)


# -- the stale config.json ---------------------------------------------------------------------


def test_stale_config_json_max_latent_size_is_ignored(tiny):
    assert json.loads((tiny / "config.json").read_text())["max_latent_size"] == 4
    cfg = read_config(tiny)
    assert cfg.max_latent_size == 8
    assert cfg.vit_max_num_patch_per_side == 8
    assert load_model(tiny, DIT_PARTS).latent_pos_embed.pos_embed.shape[0] == 64


# -- memory check at full size (spec 2.2) ------------------------------------------------------


def params_of(parts: frozenset[str]) -> int:
    return stage_bytes(FULL, parts, bytes_per_param=1)


def test_full_size_layout():
    layout = checkpoint_layout(FULL)
    assert len(layout) == 1223
    assert sum(math.prod(s) for s in layout.values()) == TOTAL_PARAMS
    assert layout["language_model.model.embed_tokens.weight"] == (152064, 3584)
    assert layout["latent_pos_embed.pos_embed"] == (4096, 3584)
    assert layout["vit_model.vision_model.embeddings.patch_embedding.weight"] == (1152, 588)
    by_part: dict[str, int] = {}
    for key, shape in layout.items():
        by_part[param_target(key).part] = by_part.get(param_target(key).part, 0) + math.prod(shape)
    assert by_part == {
        "und": UND_PARAMS - EMBED_PARAMS,
        "lm_head": EMBED_PARAMS,
        "gen": GEN_PARAMS,
        "gen_heads": GEN_HEAD_PARAMS,
        "vit": VIT_PARAMS + CONNECTOR_PARAMS + VIT_POS_PARAMS,
    }


def test_full_size_stage_bytes():
    vit = VIT_PARAMS + CONNECTOR_PARAMS + VIT_POS_PARAMS
    assert params_of(frozenset({"und", "lm_head"})) == UND_PARAMS
    assert params_of(frozenset({"gen"})) == GEN_PARAMS
    assert params_of(frozenset({"vit"})) == vit
    assert stage_bytes(FULL, THINKER_PARTS) == 2 * (UND_PARAMS + vit) == 16_105_438_016
    assert stage_bytes(FULL, DIT_PARTS) == 2 * (UND_PARAMS - EMBED_PARAMS + GEN_PARAMS + GEN_HEAD_PARAMS + vit) == 28_124_525_504
    assert stage_bytes(FULL, ALL_PARTS) == 2 * TOTAL_PARAMS == 29_214_520_256


@pytest.mark.parametrize("parts", [THINKER_PARTS, DIT_PARTS, ALL_PARTS], ids=["thinker", "dit", "all"])
def test_full_size_model_on_meta_matches_checkpoint(parts):
    """The fused module tree holds exactly the checkpoint's numbers for the stage."""
    with torch.device("meta"):
        model = BagelModel(FULL, parts - {"vae"})
    assert sum(p.numel() for p in model.parameters()) == params_of(parts)
    assert [n for n, _ in model.named_buffers()] == ["language_model.model.inv_freq"]
