"""End-to-end tests of the `bagel-ray` command line on the tiny model (CPU, real weights,
real files): every modality, prompt files, bad input, and the golden text2text and image
cases (TaylorSeer's included) run through the flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bagel_ray.cli import main
from bagel_ray.model.image_transforms import resize_size
from bagel_ray.model.layout import EMA_FILE
from bagel_ray.model.loader import read_config
from bagel_ray.model.tiny import TINY_CONFIG, tiny_model_path
from tests.conftest import REPO_ROOT
from tests.golden import assert_matches

FAST = ["--steps", "3", "--max-tokens", "5"]


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    """One tiny model for the whole module, made in the test's temp area."""
    cache = tmp_path_factory.mktemp("bagel-ray-cache")
    tiny_model_path(cache)
    return cache


@pytest.fixture(autouse=True)
def _cache_env(tiny_cache, monkeypatch):
    monkeypatch.setenv("BAGEL_RAY_CACHE", str(tiny_cache))


@pytest.fixture
def input_png(tmp_path) -> Path:
    path = tmp_path / "input.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 100, 3), dtype=np.uint8)).save(path)
    return path


def generate(out: Path, *flags: str) -> int:
    return main(["generate", "--model", "tiny", "--device", "cpu", "--output", str(out), *flags])


def read_results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


# -- every modality ---------------------------------------------------------------------------


@pytest.mark.parametrize("modality", ["text2img", "img2img", "img2text", "text2text"])
def test_modality(modality, tmp_path, input_png, capsys):
    out = tmp_path / "out"
    flags = ["--modality", modality, "--prompts", "a red fox", "a blue bird", *FAST]
    if modality in ("img2img", "img2text"):
        flags += ["--image-path", str(input_png)]
    assert generate(out, *flags) == 0
    assert capsys.readouterr().out.strip().endswith(f"wrote 2 results to {out / 'results.jsonl'}")

    records = read_results(out)
    assert [r["prompt"] for r in records] == ["a red fox", "a blue bird"]
    for i, r in enumerate(records):
        assert set(r) == {"prompt", "modality", "text", "token_ids", "think_text", "think_token_ids", "image", "seed", "timings"}
        assert (r["modality"], r["seed"], r["timings"]) == (modality, 42, None)
        if modality in ("text2img", "img2img"):
            assert r["image"] == f"{i:05d}.png" and r["text"] is None
            with Image.open(out / r["image"]) as png:
                assert png.format == "PNG" and png.mode == "RGB"
                # text2img: 1024 clamped to the tiny model's largest side; img2img: the input's VAE size.
                want = (128, 128) if modality == "text2img" else resize_size(100, 60, TINY_CONFIG.vae_transform)
                assert png.size == want
        else:
            assert r["image"] is None
            assert isinstance(r["text"], str) and 1 <= len(r["token_ids"]) <= 5
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temp files left


def test_txt_prompts_size_and_stats(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a lighthouse\n\n   \n  a boat at sea  \n")
    out = tmp_path / "out"
    assert generate(out, "--txt-prompts", str(prompts), "--steps", "2", "--height", "32", "--width", "48",
                    "--seed", "7", "--enable-stats") == 0
    stdout = capsys.readouterr().out
    records = read_results(out)
    assert [r["prompt"] for r in records] == ["a lighthouse", "a boat at sea"]
    for r in records:
        assert r["seed"] == 7
        assert {"prefill_s", "denoise_s", "vae_decode_s"} <= set(r["timings"])
        with Image.open(out / r["image"]) as png:
            assert png.size == (48, 32)
    assert "denoise_s=" in stdout


def test_same_seed_same_image(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert generate(out, "--prompts", "x", "--steps", "2", "--height", "32", "--width", "32") == 0
    assert (a / "00000.png").read_bytes() == (b / "00000.png").read_bytes()


def test_make_tiny_model(tmp_path, capsys):
    folder = tmp_path / "tiny"
    assert main(["make-tiny-model", str(folder), "--seed", "3"]) == 0
    assert (folder / EMA_FILE).exists()
    assert read_config(folder).max_image_side == TINY_CONFIG.max_image_side
    assert str(folder) in capsys.readouterr().out


def test_make_random_model(tmp_path, capsys):
    """The full-size writer, at the tiny size here (tests/model/test_random_checkpoint.py checks
    the 7b tensor table and files without writing 29 GB)."""
    folder = tmp_path / "random"
    assert main(["make-random-model", str(folder), "--size", "tiny", "--seed", "1"]) == 0
    assert read_config(folder) == TINY_CONFIG
    out = capsys.readouterr().out
    assert "wrote the tiny random model (seed 1, 0.01 GB)" in out and str(folder) in out


# -- bad input ----------------------------------------------------------------------------------


# {tmp}: the test's temp folder, holding not_an_image.png, empty.txt and empty_model/;
# {image}: a valid input image.
BAD_INPUTS = {
    "missing image file": ["--modality", "img2text", "--prompts", "x", "--image-path", "{tmp}/nope.png"],
    "unreadable image": ["--modality", "img2img", "--prompts", "x", "--image-path", "{tmp}/not_an_image.png"],
    "decompression bomb": ["--modality", "img2text", "--prompts", "x", "--image-path", "{tmp}/bomb.png"],
    "no image for img2img": ["--modality", "img2img", "--prompts", "x"],
    "image for text-only": ["--modality", "text2text", "--prompts", "x", "--image-path", "{image}"],
    "size for img2img": ["--modality", "img2img", "--prompts", "x", "--image-path", "{image}", "--height", "64"],
    "size too large": ["--prompts", "x", "--width", "256"],
    "cfg interval lo > hi": ["--prompts", "x", "--cfg-interval", "0.9", "0.1"],
    "sampling at temperature 0 (greedy)": ["--modality", "text2text", "--prompts", "x", "--temperature", "0", "--do-sample"],
    "no prompts": [],
    "missing prompts file": ["--txt-prompts", "{tmp}/nope.txt"],
    "empty prompts file": ["--txt-prompts", "{tmp}/empty.txt"],
    "bad model path": ["--prompts", "x", "--model", "{tmp}/no_such_model"],
    "not a checkpoint": ["--prompts", "x", "--model", "{tmp}/empty_model"],
    "bad device": ["--prompts", "x", "--device", "nonsense"],
    "ray flag without the ray backend": ["--prompts", "x", "--stage-configs-path", "{tmp}/empty.txt"],
}


def bomb_png(side: int = 20000) -> bytes:
    """A PNG whose header declares side x side pixels (400M: past twice PIL's
    MAX_IMAGE_PIXELS, so opening it raises DecompressionBombError)."""
    import io
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    real = buf.getvalue()
    chunk = b"IHDR" + struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return real[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + real[33:]


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(case, tmp_path, input_png, capsys):
    (tmp_path / "not_an_image.png").write_text("hello")
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "empty_model").mkdir()
    flags = [f.format(tmp=tmp_path, image=input_png) for f in BAD_INPUTS[case]]
    out = tmp_path / "out"
    # The case's own --model/--device come after the defaults in `generate`; argparse keeps the last.
    assert generate(out, *flags) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err
    assert not (out / "results.jsonl").exists()


@pytest.mark.parametrize("flags", [
    ["--modality", "img2video", "--prompts", "x"],
    ["--prompts", "x", "--cfg-renorm-type", "none"],
    ["--prompts", "x", "--steps", "many"],
    # the HTTP API's types and ranges (issue 25 items 7 and 9): argparse's one line, exit 2
    ["--prompts", "x", "--height", "100"],
    ["--prompts", "x", "--steps", "0"],
    ["--prompts", "x", "--num-inference-steps", "501"],
    ["--prompts", "x", "--steps", "2.0"],
    ["--modality", "text2text", "--prompts", "x", "--max-tokens", "0"],
    ["--modality", "text2text", "--prompts", "x", "--max-tokens", str(10**12)],
    ["--prompts", "x", "--seed", str(2**70)],
    ["--prompts", "x", "--seed", "-1"],
    ["--prompts", "x", "--cfg-renorm-min", "2"],
    ["--prompts", "x", "--cfg-text-scale", "-1"],
    ["--prompts", "x", "--cfg-img-scale", "nan"],
    ["--prompts", "x", "--cfg-interval", "0", "1.5"],
    ["--prompts", "x", "--timestep-shift", "0"],
    ["--modality", "text2text", "--prompts", "x", "--temperature", "-0.1"],
    ["--modality", "text2text", "--prompts", "x", "--top-p", "1.5"],
    ["--prompts", "x", "--worker-backend", "thread"],
    ["--prompts", "x", "--txt-prompts", "p.txt"],
])
def test_bad_flag_syntax(flags, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        generate(tmp_path / "out", *flags)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err.strip().splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_knob_flags_come_from_the_knob_table(capsys):
    """Every knob is a flag named after it (aliases too), with its official default in the help."""
    from bagel_ray.cli import build_parser
    from bagel_ray.knobs import KNOBS

    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for knob in KNOBS:
        for flag in knob.flags:
            assert flag in help_text
    assert "--num-inference-steps N, --steps N" in help_text and "50 for text2img, 50 for img2img" in help_text
    args = parser.parse_args(["generate", "--steps", "7", "--taylorseer", "--cfg-interval", "0", "1"])
    assert (args.num_inference_steps, args.taylorseer, args.cfg_interval) == (7, True, [0.0, 1.0])


# -- as a process ---------------------------------------------------------------------------------


def run_module(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "bagel_ray", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_python_m_bagel_ray(tmp_path):
    proc = run_module("generate", "--model", "tiny", "--device", "cpu", "--prompts", "a red fox", "--steps", "3",
                      "--height", "32", "--width", "64", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "wrote 1 results to outputs/results.jsonl"
    # in a pipe, progress as readable lines (no carriage-return redraws)
    assert "\r" not in proc.stderr
    assert "prompts: 1/1" in proc.stderr.splitlines() and "denoise: 2/2 steps" in proc.stderr.splitlines()  # 3 steps: 2 evaluations
    (record,) = read_results(tmp_path / "outputs")
    with Image.open(tmp_path / "outputs" / record["image"]) as png:
        assert png.size == (64, 32)

    proc = run_module("generate", "--model", "tiny", "--modality", "img2text", "--prompts", "x",
                      "--image-path", "missing.png", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: cannot read image missing.png") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr


def test_ctrl_c_ends_with_one_line(monkeypatch, capsys):
    from bagel_ray import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "generate", interrupted)
    assert cli.main(["generate", "--prompts", "x"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


@pytest.mark.parametrize("text,words", [
    (None, "cannot read Serve config"),
    ("applications: [{name: bagel, import_path: bagel_ray.serve.app:build_app, args: {metrics_export_port: 0}}]",
     "metrics_export_port"),
])
def test_serve_refuses_a_bad_config_in_one_line_before_starting_ray(tmp_path, capsys, text, words):
    config = tmp_path / "app.yaml"
    if text is not None:
        config.write_text(text)
    assert main(["serve", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err


# -- golden ---------------------------------------------------------------------------------------


def test_golden_text2text(golden_model_dir, manifest, tmp_path):
    case = manifest["cases"]["text2text"]
    out = tmp_path / "out"
    assert main(["generate", "--model", str(golden_model_dir), "--modality", "text2text", "--prompts", case["prompt"],
                 "--max-tokens", str(case["max_length"] - 1), "--dtype", "float32", "--device", "cpu",
                 "--output", str(out)]) == 0
    (record,) = read_results(out)
    assert record["token_ids"] == case["results"]["generated_ids"]
    assert record["text"] == case["results"]["output_text"]


@pytest.mark.parametrize("name", ["text2img", "text2img_taylorseer", "img2img_taylorseer"])
def test_golden_image(golden_dir, golden_model_dir, manifest, tmp_path, name):
    """The official images through the flags, from the seed (`--taylorseer` for the step-cache
    cases, whose every knob the manifest's `hyper` gives)."""
    case = manifest["cases"][name]
    hyper = case["hyper"]
    if case["kind"] == "img2img":
        shape = ["--modality", "img2img", "--image-path", str(golden_dir / case["input_image"])]
    else:
        height, width = case["image_shape"]
        shape = ["--modality", "text2img", "--height", str(height), "--width", str(width)]
    out = tmp_path / "out"
    assert main([
        "generate", "--model", str(golden_model_dir), *shape, "--prompts", case["prompt"],
        "--steps", str(case["num_timesteps"]), "--seed", str(case["seed"]),
        "--cfg-text-scale", str(hyper["cfg_text_scale"]), "--cfg-img-scale", str(hyper["cfg_img_scale"]),
        "--cfg-interval", *map(str, hyper["cfg_interval"]), "--cfg-renorm-type", hyper["cfg_renorm_type"],
        "--cfg-renorm-min", str(hyper["cfg_renorm_min"]), "--timestep-shift", str(hyper["timestep_shift"]),
        *(["--taylorseer"] if hyper.get("enable_taylorseer") else []),
        "--dtype", "float32", "--device", "cpu", "--output", str(out),
    ]) == 0
    (record,) = read_results(out)
    with Image.open(out / record["image"]) as png, Image.open(golden_dir / case["png"]) as want:
        actual, expected = torch.tensor(np.array(png)), torch.tensor(np.array(want.convert("RGB")))
    assert_matches(f"{name}.png", actual, expected, case["tensors"]["image_uint8"]["compare"])
