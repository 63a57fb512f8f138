"""A real local Ray cluster with the tiny Serve app (deployments/tiny.yaml), shared by the
serve tests of one session: starting Ray costs ~15 s on 2 cores."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from benchmarks.time_to_ready import free_port
from tests.conftest import REPO_ROOT
from tests.determinism import torch_threads, worker_thread_count


@dataclass
class ServeApp:
    handle: object
    url: str
    name: str
    args: dict


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("bagel-cache")
    os.environ["BAGEL_RAY_CACHE"] = str(cache)  # inherited by the Ray workers started below
    return cache


@pytest.fixture(scope="session")
def ray_session(tiny_cache):
    ray = pytest.importorskip("ray")
    # Serve kills a proxy that is not ready within 5 s (its default); on a loaded 2-core host
    # that killed every proxy while it started. Inherited by the processes Ray starts.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_app(ray_session) -> ServeApp:
    from ray import serve

    from bagel_ray.serve.app import build_app

    config = yaml.safe_load((REPO_ROOT / "deployments" / "tiny.yaml").read_text())
    app_cfg = config["applications"][0]
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    handle = serve.run(build_app(app_cfg["args"]), name=app_cfg["name"], route_prefix=app_cfg["route_prefix"])
    return ServeApp(handle, f"http://127.0.0.1:{port}", app_cfg["name"], app_cfg["args"])


@pytest.fixture(scope="session")
def two_stage_app(serve_app) -> ServeApp:
    """A second app on the same cluster: edit contexts built on the Thinker (so img2img goes
    through the KV handoff too) and both stages autoscaled instead of fixed."""
    import copy

    from ray import serve

    from bagel_ray.serve.app import build_app

    args = copy.deepcopy(serve_app.args)
    args["edit_contexts_on"] = "thinker"
    for stage, bounds in (("thinker", (1, 3)), ("dit", (1, 2))):
        del args[stage]["num_replicas"]
        args[stage]["autoscaling_config"] = {"min_replicas": bounds[0], "max_replicas": bounds[1], "target_ongoing_requests": 2}
    handle = serve.run(build_app(args), name="two-stage", route_prefix="/two-stage")
    return ServeApp(handle, serve_app.url + "/two-stage", "two-stage", args)


def deploy_variant(base: ServeApp, name: str, changes: dict) -> ServeApp:
    """Another app on the session cluster, at /name: the tiny app's args with `changes`
    (dotted keys -> values, e.g. {"dit.max_queued_requests": 1}) applied. The caller deletes
    it with `serve.delete(name)` when done."""
    import copy

    from ray import serve

    from bagel_ray.serve.app import build_app

    args = copy.deepcopy(base.args)
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = args
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    handle = serve.run(build_app(args), name=name, route_prefix=f"/{name}")
    return ServeApp(handle, f"{base.url}/{name}", name, args)


def replica_actor_names(app: str, deployment: str) -> list[str]:
    """Names of the live replica actors of one deployment (Serve names them
    SERVE_REPLICA::<app>#<deployment>#<id> in the `serve` namespace)."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


def _torch_threads(_replica) -> int:
    import torch

    return torch.get_num_threads()


def replica_thread_counts(app: str, deployment: str) -> list[int]:
    """torch's intra-op thread count in each live replica of one deployment."""
    import ray

    return ray.get([ray.get_actor(name, namespace="serve").__ray_call__.remote(_torch_threads)
                    for name in replica_actor_names(app, deployment)], timeout=60)


@pytest.fixture(scope="module")
def local(tiny_cache):
    """The reference, run at the replicas' intra-op thread count (tests/determinism.py): a
    request alone gives the replica's result bit for bit only at the same count."""
    from bagel_ray.engine.pipeline import LocalPipeline

    with torch_threads(worker_thread_count()):
        yield LocalPipeline.from_pretrained("tiny", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def picture():
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
