"""A real multi-node Ray cluster on one machine (`ray.cluster_utils.Cluster`: a raylet per
node, each with its own resources and ports) running deployments/tiny_cluster.yaml: a head
(Serve controller, HTTP proxy and the ingress), a `thinker_node` node and `dit_node` nodes, the
node types of cluster.yaml.

Used by tests/serve/test_multinode.py and benchmarks/soak.py. This process never connects to
the cluster (`ray.init` may already be taken by the single-node cluster of
tests/serve/conftest.py in the same pytest run): the app is deployed,
and read back, through the head's dashboard REST API, as `serve deploy` and KubeRay do; nodes
are added and killed through the `Cluster` object; each node's metrics come from its own
metrics export port.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import requests
import yaml

from benchmarks.time_to_ready import free_port

CONFIG = Path(__file__).resolve().parent.parent / "deployments" / "tiny_cluster.yaml"
# Node death is seen within ~3 s (GCS health checks every second, 3 misses); metrics are
# exported every second, so a test reads a request's counters soon after its answer.
SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3, "metrics_report_interval_ms": 1000}
NODE_CPUS = 1  # each node's share of the 2 cores the tests run on; the replicas ask for 0.1


def auth_headers() -> dict[str, str]:
    """The Ray token, when this process runs with token auth (a `ray.init()` in it turned that
    on, and the nodes started here inherit it), for the dashboard's REST API."""
    from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

    return get_auth_headers_if_auth_enabled({})



def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc; the workers a raylet started)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
    return found

def started(start: Callable[[], Any], what: str, tries: int = 2) -> Any:
    """`start()`, tried again when Ray says the node "timed out during startup": on a loaded
    2-core machine a new raylet now and then dies within seconds of starting, silently, and
    Ray gives up on it after a fixed 30 s. Any other failure is raised at once."""
    for attempt in range(1, tries + 1):
        try:
            return start()
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for this
            if "timed out during startup" not in str(exc) or attempt == tries:
                raise
            print(f"multinode: the {what} did not start ({exc}); starting it again", flush=True)


@dataclass
class MultiNodeApp:
    cluster: Any  # ray.cluster_utils.Cluster
    dashboard: str
    url: str
    name: str
    args: dict
    thinker: Any | None  # ray._private.node.Node
    dits: list = field(default_factory=list)

    # -- nodes ----------------------------------------------------------------------------

    def add_node(self, kind: str):
        """A node of cluster.yaml's type `thinker_gpu` or `dit_gpu` (its marker resource, no GPU)."""
        node = started(lambda: self.cluster.add_node(num_cpus=NODE_CPUS, resources={kind: 1}, object_store_memory=100 << 20),
                       kind)
        if kind == "dit_node":
            self.dits.append(node)
        else:
            self.thinker = node
        return node

    def kill(self, node) -> float:
        """Kill the node's raylet and every worker on it at once (no graceful drain); returns when.
        The workers are killed first, with SIGKILL: left to notice their raylet is gone, a
        replica goes on serving for a second or more, and requests in flight finish there."""
        from ray._private import ray_constants

        for raylet in node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET, []):
            for pid in children(raylet.process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.cluster.remove_node(node, allow_graceful=False)
        if node in self.dits:
            self.dits.remove(node)
        if node is self.thinker:
            self.thinker = None
        return time.monotonic()

    def cpu_seconds(self, node) -> float:
        """CPU time the node's workers have used so far (Linux /proc): read twice, it says
        whether its replicas are working now, which a metric exported a second ago does not."""
        from ray._private import ray_constants

        ticks = 0
        for raylet in node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET, []):
            for pid in children(raylet.process.pid):
                with contextlib.suppress(OSError):
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    ticks += int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / os.sysconf("SC_CLK_TCK")

    @property
    def head(self):
        return self.cluster.head_node

    # -- Serve, as its REST API shows it ----------------------------------------------------

    def details(self) -> dict:
        resp = requests.get(f"{self.dashboard}/api/serve/applications/", headers=auth_headers(), timeout=30)
        resp.raise_for_status()
        return resp.json()

    def replicas(self, deployment: str, state: str = "RUNNING") -> list[dict]:
        app = self.details()["applications"].get(self.name)
        if app is None:
            return []
        return [r for r in app["deployments"][deployment]["replicas"] if r["state"] == state]

    def wait_for(self, deployment: str, nodes: list, timeout_s: float = 120) -> list[dict]:
        """Until exactly one RUNNING replica of `deployment` is on each of `nodes` (and none elsewhere)."""
        want = sorted(n.node_id for n in nodes)
        deadline = time.monotonic() + timeout_s
        while True:
            running = self.replicas(deployment)
            if sorted(r["node_id"] for r in running) == want:
                return running
            assert time.monotonic() < deadline, f"{deployment}: replicas on {[r['node_id'] for r in running]}, want {want}"
            time.sleep(0.5)

    def metric(self, node, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        """Samples of one Prometheus metric exported by `node`: labels (sorted, without Ray's
        own) -> value."""
        text = requests.get(f"http://127.0.0.1:{node.metrics_export_port}/metrics", timeout=10).text
        samples = {}
        for line in text.splitlines():
            if not line.startswith(name + "{"):
                continue
            labels, value = line[len(name) + 1:].rsplit("} ", 1)
            pairs = tuple(sorted((k, v.strip('"')) for k, v in (p.split("=", 1) for p in labels.split(",") if p)
                                 if k not in ("Component", "NodeAddress", "SessionName", "Version", "WorkerId", "JobId")))
            samples[pairs] = samples.get(pairs, 0.0) + float(value)
        return samples


def config(port: int) -> dict:
    """deployments/tiny_cluster.yaml with its HTTP port moved to `port`."""
    raw = yaml.safe_load(CONFIG.read_text())
    raw = copy.deepcopy(raw)
    raw["http_options"]["port"] = port
    return raw


def start(cache: Path, dit_nodes: int = 2, timeout_s: float = 240) -> MultiNodeApp:
    """The cluster and the app on it, RUNNING. The caller calls `stop`."""
    from ray.cluster_utils import Cluster

    os.environ["BAGEL_RAY_CACHE"] = str(cache)  # the nodes' workers inherit it

    def head() -> tuple[Any, int]:  # a port of its own each try: a failed head's dashboard may hold the last
        port = free_port()
        return Cluster(initialize_head=True, head_node_args={
            "num_cpus": NODE_CPUS, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port,
            "object_store_memory": 100 << 20, "_system_config": SYSTEM_CONFIG}), port

    cluster, dashboard_port = started(head, "head node")
    serve_config = config(free_port())
    app_cfg = serve_config["applications"][0]
    app = MultiNodeApp(cluster, f"http://127.0.0.1:{dashboard_port}", f"http://127.0.0.1:{serve_config['http_options']['port']}",
                       app_cfg["name"], app_cfg["args"], None)
    try:
        app.add_node("thinker_node")
        for _ in range(dit_nodes):
            app.add_node("dit_node")
        deadline = time.monotonic() + timeout_s
        last = None
        while True:  # the dashboard's Serve module comes up a while after the head
            try:
                resp = requests.put(f"{app.dashboard}/api/serve/applications/", json=serve_config, headers=auth_headers(),
                                    timeout=30)
                if resp.ok:
                    break
                last = f"{resp.status_code}: {resp.text[:2000]}"
            except requests.RequestException as exc:
                last = repr(exc)
            assert time.monotonic() < deadline, f"the dashboard never took the Serve config ({last})"
            time.sleep(1)
        while True:
            status = app.details()["applications"].get(app.name, {}).get("status")
            if status == "RUNNING":
                return app
            assert status not in ("DEPLOY_FAILED", "UNHEALTHY") and time.monotonic() < deadline, app.details()
            time.sleep(1)
    except BaseException:
        stop(app)
        raise


def stop(app: MultiNodeApp) -> None:
    app.cluster.shutdown()
