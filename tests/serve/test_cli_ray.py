"""`bagel-ray generate --worker-backend ray` against the session's tiny Serve app.

The Ray backend must write the same results.jsonl and PNGs as the process backend for the
same flags: the same records and texts, and pixels within `PIXEL_TOL` (tests/determinism.py),
since the Ray backend sends the prompts at once and the DiT replica denoises them as one batch,
whose products may round otherwise than each prompt's alone in the process backend (an
AVX-512 Xeon's do). The CLI reuses the running app and the in-process Ray: it neither redeploys
nor removes them. An app it deploys itself is deleted at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from bagel_ray.cli import main
from tests.conftest import REPO_ROOT
from tests.determinism import assert_pixels_close

TINY_YAML = REPO_ROOT / "deployments" / "tiny.yaml"
FAST = ["--steps", "3", "--max-tokens", "5"]
PROMPTS = ["a red fox", "a blue bird", "a green frog"]
MODALITY_FLAGS = {
    "text2text": [],
    "img2text": ["--image-path", "{image}"],
    "text2img": ["--height", "32", "--width", "32"],
    "img2img": ["--image-path", "{image}"],
}


@pytest.fixture(scope="module")
def input_png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "input.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)
    return path


def generate(backend: str, out: Path, *flags: str) -> int:
    return main(["generate", "--model", "tiny", "--device", "cpu", "--worker-backend", backend, "--output", str(out), *flags])


def read_results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as png:
        return np.asarray(png.convert("RGB"))


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def assert_app_untouched(app) -> None:
    import ray
    from ray import serve

    assert ray.is_initialized()
    assert serve.status().applications[app.name].status == "RUNNING"


def write_config(path: Path, edit) -> Path:
    config = yaml.safe_load(TINY_YAML.read_text())
    edit(config)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("modality", list(MODALITY_FLAGS))
def test_ray_backend_matches_process(serve_app, modality, tmp_path, input_png, worker_threads, capsys):
    flags = ["--modality", modality, "--prompts", *PROMPTS, *FAST, "--seed", "9",
             *(f.format(image=input_png) for f in MODALITY_FLAGS[modality])]
    assert generate("process", tmp_path / "process", *flags) == 0
    capsys.readouterr()
    assert generate("ray", tmp_path / "ray", *flags) == 0  # no --stage-configs-path: tiny.yaml, the running app
    captured = capsys.readouterr()
    assert captured.out.strip().endswith(f"wrote 3 results to {tmp_path / 'ray' / 'results.jsonl'}")
    assert "prompts" in captured.err and "denoise" not in captured.err  # the prompt bar only

    got, want = read_results(tmp_path / "ray"), read_results(tmp_path / "process")
    assert got == want  # prompts, text, token_ids, seeds, image names
    assert [r["prompt"] for r in got] == PROMPTS
    for r in got:
        if r["image"] is None:
            assert r["token_ids"]
        else:
            assert_pixels_close(pixels(tmp_path / "ray" / r["image"]), pixels(tmp_path / "process" / r["image"]), r["image"])
    assert_app_untouched(serve_app)


def test_stats_carry_the_kv_handoff(serve_app, tmp_path, capsys):
    out = tmp_path / "out"
    assert generate("ray", out, "--prompts", "a lighthouse", "--steps", "3", "--height", "32", "--width", "32",
                    "--think", "--max-think-tokens", "4", "--enable-stats") == 0
    stdout = capsys.readouterr().out
    (record,) = read_results(out)
    timings = record["timings"]
    assert {"prefill_s", "denoise_s", "vae_decode_s", "handoff_send_s", "handoff_receive_s", "total_s"} <= set(timings)
    assert timings["handoff_bytes"] > 0 and record["think_token_ids"]
    assert f"handoff_bytes={timings['handoff_bytes']:.0f} " in stdout and "denoise_s=" in stdout


def test_bad_stage_config_is_one_line(serve_app, tmp_path, capsys):
    path = write_config(tmp_path / "bad.yaml", lambda c: c["applications"][0]["args"]["thinker"].update(bogus=1))
    out = tmp_path / "out"
    assert generate("ray", out, "--prompts", "x", "--stage-configs-path", str(path)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "thinker.bogus" in line and str(path) in line
    assert not (out / "results.jsonl").exists()
    assert_app_untouched(serve_app)


def test_flags_must_match_a_reused_app(serve_app, tmp_path, capsys):
    assert generate("ray", tmp_path / "out", "--prompts", "x", "--dtype", "bfloat16") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "thinker.dtype='float32'" in line and "bfloat16" in line
    assert_app_untouched(serve_app)


def test_needs_a_config_unless_tiny(serve_app, tmp_path, capsys):
    assert main(["generate", "--worker-backend", "ray", "--prompts", "x", "--output", str(tmp_path)]) == 2
    assert "--stage-configs-path" in one_error_line(capsys.readouterr().err)


def test_deploys_an_app_it_does_not_find_and_removes_it(serve_app, tmp_path, capsys):
    from ray import serve

    def rename(config: dict) -> None:
        app = config["applications"][0]
        app["name"], app["route_prefix"] = "cli-deployed", "/cli-deployed"
        app["args"]["thinker"]["max_batch_size"] = 2  # differs from the running app: a new deploy, not a reuse

    path = write_config(tmp_path / "app.yaml", rename)
    flags = ["--modality", "text2text", "--prompts", *PROMPTS, *FAST]
    assert generate("ray", tmp_path / "deployed", *flags, "--stage-configs-path", str(path), "--dtype", "float32") == 0
    assert "cli-deployed" not in serve.status().applications
    assert_app_untouched(serve_app)
    assert generate("ray", tmp_path / "reused", *flags) == 0
    assert read_results(tmp_path / "deployed") == read_results(tmp_path / "reused")


def test_as_a_process_joining_the_cluster(serve_app, ray_session, tmp_path):
    """A separate `python -m bagel_ray` connects by address, uses the app, and leaves it running."""
    address = ray_session.get_runtime_context().gcs_address
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "bagel_ray", "generate", "--worker-backend", "ray", "--ray-address", address,
         "--model", "tiny", "--modality", "text2img", "--prompts", "a cat", "--steps", "3", "--height", "32",
         "--width", "48", "--seed", "4"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "wrote 1 results to outputs/results.jsonl"
    assert "prompts" in proc.stderr and "denoise" not in proc.stderr
    (record,) = read_results(tmp_path / "outputs")
    assert pixels(tmp_path / "outputs" / record["image"]).shape == (32, 48, 3)
    assert_app_untouched(serve_app)


def test_its_own_ray_leaves_a_listening_port_alone(tmp_path):
    """Without --ray-address the CLI starts a Ray of its own and deploys the app there for its
    handle only: no HTTP proxy, so a server on the config's port (8000) is left alone."""
    import socket

    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            server.bind(("127.0.0.1", 8000))
        except OSError:
            pytest.skip("port 8000 is taken on this machine")  # someone's server: the point stands, untestable here
        server.listen()
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), RAY_ADDRESS="local")
        proc = subprocess.run(
            [sys.executable, "-m", "bagel_ray", "generate", "--worker-backend", "ray", "--model", "tiny", "--device", "cpu",
             "--modality", "text2text", "--prompts", "hi", "--max-tokens", "3"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_results(tmp_path / "outputs")[0]["text"] is not None


HEAD_WITH_TOKEN = """
import sys, ray
ray.init(num_cpus=1, include_dashboard=False)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the test closes stdin
"""


def test_a_cluster_with_token_auth_gets_a_one_line_hint(tmp_path):
    """A cluster under Ray's token auth refuses a CLI without the token: one error line that
    says what to set, not a traceback."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), RAY_ADDRESS="local", RAY_AUTH_MODE="token", HOME=str(tmp_path))
    head = subprocess.Popen([sys.executable, "-c", HEAD_WITH_TOKEN], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        address = head.stdout.readline().strip()
        assert address, "the token-auth head did not start"
        client_env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), RAY_AUTH_MODE="disabled")
        client_env.pop("RAY_AUTH_TOKEN", None)
        proc = subprocess.run([sys.executable, "-m", "bagel_ray", "generate", "--worker-backend", "ray", "--ray-address",
                               address, "--model", "tiny", "--prompts", "x"],
                              cwd=tmp_path, env=client_env, capture_output=True, text=True, timeout=180)
    finally:
        head.stdin.close()
        head.wait(timeout=60)
    assert proc.returncode == 2, proc.stderr[-3000:]
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "RAY_AUTH_MODE=token" in ours[0] and "RAY_AUTH_TOKEN" in ours[0]
