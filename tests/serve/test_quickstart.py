"""The README's quick start (`bagel-ray serve deployments/tiny.yaml`) runs the app on a Ray of
its own even when another cluster is there to be joined (issue 25 item 13: a bare `serve run`
silently deployed into a cluster someone else had started), its console names the cluster the
app runs in, and the metrics are on the config's fixed `metrics_export_port`, said at start-up
(issue 23: Ray picked the port at random and nothing said where it was)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time

import requests
import yaml

from tests.conftest import REPO_ROOT
from tests.jobs.cluster import free_port

WORKER_PORTS = range(10002, 20000)  # Ray's default worker ports: a node refuses another port of its own in them


def quick_start_command() -> list[str]:
    readme = (REPO_ROOT / "README.md").read_text()
    line = next(line for line in readme.splitlines() if "bagel-ray serve" in line and line.startswith("pip install"))
    return shlex.split(line.split("&&")[-1])


def test_the_quick_start_runs_on_its_own_ray_with_its_metrics_where_it_says(ray_session, tmp_path):
    cmd = quick_start_command()
    assert cmd[:2] == ["bagel-ray", "serve"] and len(cmd) == 3, cmd
    config = yaml.safe_load((REPO_ROOT / cmd[-1]).read_text())
    args = config["applications"][0]["args"]
    assert args["metrics_export_port"] == 8080  # the port the README names
    port, metrics_port = free_port(WORKER_PORTS), free_port(WORKER_PORTS)  # 8000 and 8080 may be anyone's here
    config["http_options"]["port"] = port
    args["metrics_export_port"] = metrics_port
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    joinable = ray_session.get_runtime_context().gcs_address  # a cluster it must not join
    env = {**os.environ, "RAY_ADDRESS": joinable, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "bagel_ray", *cmd[1:-1], str(tmp_path / "tiny.yaml")], cwd=REPO_ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if any("Driver ready" in l for l in seen) and any(l.startswith("bagel-ray: app") for l in seen):
                break
        ready = next((line for line in seen if "Driver ready" in line), None)
        started = next((line for line in seen if line.startswith("bagel-ray: app")), None)
        assert ready is not None and started is not None, "".join(seen[-40:])
        cluster = re.search(r"Ray cluster at (\S+)", ready).group(1)
        assert cluster != joinable, ready
        for line in (ready, started):  # said at start-up, at the fixed port, with no "not the configured" note
            assert re.search(rf"metrics at http://[\w.]+:{metrics_port}/metrics(;|$)", line.rstrip()), line
            assert "not the configured" not in line, line
        assert f"serving at http://127.0.0.1:{port}/" in started, started
        chat = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120,
                             json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert chat.status_code == 200, chat.text
        deadline, text = time.monotonic() + 90, ""
        while "ray_bagel_requests_total" not in text and time.monotonic() < deadline:
            time.sleep(2)  # Ray exports a process's metrics every few seconds
            text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        assert any(l.startswith("ray_bagel_requests_total") and 'modality="text2text"' in l for l in text.splitlines())
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
    assert proc.returncode == 130 and "interrupted" in out.splitlines(), out[-2000:]  # Ctrl-C: one line, exit 130
