"""A Ray cluster of its own for the bulk-job tests: `ray start --head --block` on loopback with
free ports, its own temp dir, token auth off, and its own `BAGEL_RAY_CACHE`, so it can live
beside the cluster that tests/serve starts with `ray.init()` in the same pytest run.

`ray stop` would stop every Ray cluster on the machine, so `stop` ends only this one: it
terminates the `ray start --block` process (which takes the GCS, raylet, dashboard and their
workers down with it) and then kills, by pid, any process still carrying this cluster's
marker variable in its environment (a job driver, say).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import requests

MARKER = "BAGEL_RAY_TEST_CLUSTER"


def free_port(avoid: range = range(0)) -> int:
    """A port free now, outside `avoid` (the worker port range, which the kernel may hand out
    too: Ray refuses to start when a component's port lies in it)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port


def ray_cli() -> list[str]:
    return [str(Path(sys.executable).with_name("ray"))] if Path(sys.executable).with_name("ray").exists() else ["ray"]


@dataclass
class JobCluster:
    dashboard: str  # http://127.0.0.1:PORT, where `ray job submit --address` goes
    env: dict[str, str]  # for the `ray` CLI and anything else that talks to this cluster
    temp_dir: Path
    marker: str
    process: subprocess.Popen

    def ray(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        """`ray ARGS...` against this cluster (for `job` subcommands, with its --address)."""
        cmd = [*ray_cli(), *args]
        if args[0] == "job":
            cmd[len(ray_cli()) + 2:len(ray_cli()) + 2] = ["--address", self.dashboard]
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def job_status(self, job_id: str) -> str:
        """PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED (from the job server's REST API)."""
        resp = requests.get(f"{self.dashboard}/api/jobs/{job_id}", timeout=30)
        resp.raise_for_status()
        return resp.json()["status"]

    def job_logs(self, job_id: str) -> str:
        return self.ray("job", "logs", job_id, timeout=60).stdout


def start(cache: Path, num_cpus: int = 4, timeout_s: float = 90) -> JobCluster:
    temp_dir = Path(tempfile.mkdtemp(prefix="rj-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "BAGEL_RAY_CACHE": str(cache), MARKER: marker})
    workers = 30000 + 200 * (os.getpid() % 100)
    names = ["--port", "--dashboard-port", "--ray-client-server-port", "--node-manager-port", "--object-manager-port",
             "--metrics-export-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--runtime-env-agent-port"]
    chosen: set[int] = set()
    while len(chosen) < len(names):  # distinct, and none among the workers'
        chosen.add(free_port(avoid=range(workers, workers + 200)))
    ports = {**dict(zip(names, sorted(chosen))), "--min-worker-port": workers, "--max-worker-port": workers + 199}
    dashboard_port = ports["--dashboard-port"]
    # Ray maps a loopback --node-ip-address to the machine's address (resolve_ip_for_localhost), so only the
    # dashboard (the job server) can be held to 127.0.0.1; every port is a free one.
    cmd = [*ray_cli(), "start", "--head", "--block", "--dashboard-host", "127.0.0.1",
           "--include-dashboard", "true", "--num-cpus", str(num_cpus), "--num-gpus", "0", "--temp-dir", str(temp_dir),
           "--disable-usage-stats", *(f"{flag}={port}" for flag, port in ports.items())]
    log = open(temp_dir / "ray-start.log", "wb")
    process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    cluster = JobCluster(f"http://127.0.0.1:{dashboard_port}", env, temp_dir, marker, process)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if requests.get(f"{cluster.dashboard}/api/version", timeout=2).ok:
                return cluster
        except requests.RequestException:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            output = (temp_dir / "ray-start.log").read_text(errors="replace")
            stop(cluster)
            raise RuntimeError(f"ray start failed or timed out:\n{output}")
        time.sleep(0.5)


def marked_pids(marker: str) -> list[int]:
    """Processes whose environment carries this cluster's marker."""
    needle = f"{MARKER}={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:  # gone, or not ours to read
                pass
    return pids


def stop(cluster: JobCluster, grace_s: float = 5) -> None:
    """SIGTERM to `ray start --block` (it stops what it started), then SIGKILL, by pid, to
    whatever of this cluster is left after `grace_s`."""
    if cluster.process.poll() is None:
        cluster.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while (cluster.process.poll() is None or marked_pids(cluster.marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in marked_pids(cluster.marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    cluster.process.wait()
    for _ in range(10):  # a process on its way out may still write a file into it
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)
        if not cluster.temp_dir.exists():
            break
        time.sleep(0.5)
