"""FLUX VAE: parameter naming against the official geometry, golden parity of encode/decode on the
tiny checkpoint (loaded through `load_vae`), the CPU RNG order of the posterior sample, and the
loader's errors on damaged files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bagel_ray.model.config import VAEConfig
from bagel_ray.model.image_transforms import decoded_to_uint8
from bagel_ray.model.vae import AutoEncoder, load_vae
from tests.golden import assert_matches, load_case_tensors

IMAGE_CASES = ["text2img", "img2img", "text2img_app", "text2img_variant", "text2img_think"]


@pytest.fixture(scope="module")
def vae_config(golden_model_dir: Path) -> VAEConfig:
    return VAEConfig.from_json(golden_model_dir / "ae_config.json")


@pytest.fixture(scope="module")
def vae(golden_model_dir: Path, vae_config: VAEConfig) -> AutoEncoder:
    return load_vae(golden_model_dir / "ae.safetensors", vae_config, "cpu", torch.float32)


@pytest.fixture(scope="module")
def img2img(golden_dir: Path, manifest: dict) -> tuple[dict, dict]:
    case = manifest["cases"]["img2img"]
    return load_case_tensors(golden_dir, case), case["tensors"]


# ---------------------------------------------------------------- naming


def test_official_geometry_has_the_244_checkpoint_tensors() -> None:
    with torch.device("meta"):
        state = AutoEncoder(VAEConfig()).state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert len(shapes) == 244  # spec 2.3
    assert shapes["encoder.conv_in.weight"] == (128, 3, 3, 3)
    assert shapes["encoder.down.1.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
    assert shapes["encoder.down.2.block.0.nin_shortcut.weight"] == (512, 256, 1, 1)
    assert shapes["encoder.down.0.downsample.conv.weight"] == (128, 128, 3, 3)
    assert "encoder.down.3.downsample.conv.weight" not in shapes
    assert shapes["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shapes["encoder.conv_out.weight"] == (32, 512, 3, 3)
    assert shapes["decoder.conv_in.weight"] == (512, 16, 3, 3)
    assert shapes["decoder.up.1.block.0.nin_shortcut.weight"] == (256, 512, 1, 1)
    assert shapes["decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert shapes["decoder.up.0.block.2.conv2.weight"] == (128, 128, 3, 3)
    assert shapes["decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in shapes
    assert shapes["decoder.norm_out.weight"] == (128,)
    assert shapes["decoder.conv_out.weight"] == (3, 128, 3, 3)


def test_tiny_model_keys_equal_the_file(golden_model_dir: Path, vae: AutoEncoder) -> None:
    with safe_open(str(golden_model_dir / "ae.safetensors"), framework="pt") as f:
        file_keys = set(f.keys())
    assert set(vae.state_dict()) == file_keys
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in vae.parameters())


# ---------------------------------------------------------------- encode


def test_golden_encoder_moments(vae: AutoEncoder, img2img) -> None:
    golden, specs = img2img
    with torch.no_grad():
        moments = vae.encode_moments(golden["vae.input_image"])
    assert_matches("vae.encoder_moments", moments, golden["vae.encoder_moments"], specs["vae.encoder_moments"]["compare"])


def test_golden_encode_with_injected_eps(vae: AutoEncoder, img2img) -> None:
    golden, specs = img2img
    with torch.no_grad():
        latent = vae.encode(golden["vae.input_image"], eps=golden["vae.posterior_eps"])
    assert_matches("vae.encoded_latent", latent, golden["vae.encoded_latent"], specs["vae.encoded_latent"]["compare"])


def test_seeded_cpu_generator_reproduces_posterior_eps(vae: AutoEncoder, img2img, manifest: dict) -> None:
    """The reference seeds the CPU generator with the case seed and the posterior draw is its
    first use, so a generator seeded alike must give the same eps and hence the same latent."""
    golden, specs = img2img
    seed = manifest["cases"]["img2img"]["seed"]
    eps = golden["vae.posterior_eps"]
    drawn = torch.randn(eps.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    assert_matches("vae.posterior_eps", drawn, eps, specs["vae.posterior_eps"]["compare"])
    x = golden["vae.input_image"]
    with torch.no_grad():
        from_generator = vae.encode(x, generator=torch.Generator().manual_seed(seed))
        with torch.random.fork_rng(devices=[]):  # the global generator, as in the notebook
            torch.manual_seed(seed)
            from_global = vae.encode(x)
        injected = vae.encode(x, eps=eps)
    assert torch.equal(from_generator, injected)
    assert torch.equal(from_global, injected)


def test_encode_rejects_misshapen_eps(vae: AutoEncoder, img2img) -> None:
    golden, _ = img2img
    with pytest.raises(ValueError, match="eps"):
        vae.encode(golden["vae.input_image"], eps=torch.zeros(1, 16, 2, 2))


# ---------------------------------------------------------------- decode


@pytest.mark.parametrize("case_name", IMAGE_CASES)
def test_golden_decode(case_name: str, vae: AutoEncoder, golden_dir: Path, manifest: dict) -> None:
    case = manifest["cases"][case_name]
    specs = case["tensors"]
    golden = load_case_tensors(golden_dir, case)
    with torch.no_grad():
        decoded = vae.decode(golden["final_latent"])
    assert_matches("decoded_raw", decoded, golden["decoded_raw"], specs["decoded_raw"]["compare"])
    assert_matches("image_uint8", decoded_to_uint8(decoded), golden["image_uint8"], specs["image_uint8"]["compare"])


# ---------------------------------------------------------------- loader errors


@pytest.fixture(scope="module")
def ae_tensors(golden_model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(golden_model_dir / "ae.safetensors"))


def test_load_vae_missing_key(tmp_path: Path, ae_tensors, vae_config: VAEConfig) -> None:
    damaged = {k: v for k, v in ae_tensors.items() if k != "encoder.mid.attn_1.q.weight"}
    save_file(damaged, str(tmp_path / "ae.safetensors"))
    with pytest.raises(ValueError, match=r"missing key 'encoder\.mid\.attn_1\.q\.weight'"):
        load_vae(tmp_path / "ae.safetensors", vae_config, "cpu", torch.float32)


def test_load_vae_wrong_shape(tmp_path: Path, ae_tensors, vae_config: VAEConfig) -> None:
    damaged = dict(ae_tensors)
    damaged["decoder.up.3.upsample.conv.bias"] = torch.zeros(7)
    save_file(damaged, str(tmp_path / "ae.safetensors"))
    with pytest.raises(ValueError, match=r"'decoder\.up\.3\.upsample\.conv\.bias' has shape \(7,\)"):
        load_vae(tmp_path / "ae.safetensors", vae_config, "cpu", torch.float32)


def test_load_vae_unexpected_key(tmp_path: Path, ae_tensors, vae_config: VAEConfig) -> None:
    damaged = dict(ae_tensors)
    damaged["encoder.down.3.downsample.conv.weight"] = torch.zeros(1)
    save_file(damaged, str(tmp_path / "ae.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected key 'encoder\.down\.3\.downsample\.conv\.weight'"):
        load_vae(tmp_path / "ae.safetensors", vae_config, "cpu", torch.float32)
