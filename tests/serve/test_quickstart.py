"""The README's quick start (`serve run --address local deployments/tiny.yaml`) runs the app on
a Ray of its own even when another cluster is there to be joined (issue 25 item 13: a bare
`serve run` silently deployed into a cluster someone else had started), and its console names
the cluster the app runs in."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests
import yaml

from tests.conftest import REPO_ROOT
from tests.serve.conftest import free_port


def quick_start_command() -> list[str]:
    readme = (REPO_ROOT / "README.md").read_text()
    line = next(line for line in readme.splitlines() if "serve run" in line and line.startswith("pip install"))
    return shlex.split(line.split("&&")[-1])


def test_the_quick_start_runs_on_its_own_ray(ray_session, tmp_path):
    cmd = quick_start_command()
    assert cmd[:4] == ["serve", "run", "--address", "local"], cmd
    config = yaml.safe_load((REPO_ROOT / cmd[-1]).read_text())
    port = free_port()
    config["http_options"]["port"] = port
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    joinable = ray_session.get_runtime_context().gcs_address  # a cluster it must not join
    env = {**os.environ, "RAY_ADDRESS": joinable, "PYTHONPATH": str(REPO_ROOT)}
    serve_cli = Path(sys.executable).with_name("serve")
    proc = subprocess.Popen([str(serve_cli), *cmd[1:-1], str(tmp_path / "tiny.yaml")], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if "Driver ready" in line:
                break
        ready = next((line for line in seen if "Driver ready" in line), None)
        assert ready is not None, "".join(seen[-40:])
        cluster = re.search(r"Ray cluster at (\S+)", ready).group(1)
        assert cluster != joinable, ready
        assert requests.get(f"http://127.0.0.1:{port}/health", timeout=30).json() == {"status": "ok"}
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
