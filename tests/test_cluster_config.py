"""cluster.yaml: valid for Ray's cluster launcher, and able to host deployments/bagel.yaml.

Offline: the config goes through the same `prepare_config` + `validate_config` that `ray up`
runs before it talks to a cloud (defaults merge and JSON-schema check), and nothing else.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

jsonschema = pytest.importorskip("jsonschema")
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

CLUSTER_YAML = REPO_ROOT / "cluster.yaml"
SERVE_YAML = REPO_ROOT / "deployments" / "bagel.yaml"
# DiT replicas of several GPUs each (one bundle per rank, packed on one node)
MULTI_GPU_YAMLS = [REPO_ROOT / "deployments" / f"bagel_dit{n}gpu.yaml" for n in (2, 4, 8)]
BUILTIN_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def check(config: dict) -> dict:
    """What `ray up` does to a config before any provider call; raises if it is invalid."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def stage_options(serve_config: dict) -> dict[str, dict]:
    """Per deployment of the bagel app: its Serve options (ray_actor_options, replicas)."""
    (app,) = serve_config["applications"]
    return {name: opts for name, opts in app["args"].items() if isinstance(opts, dict) and "ray_actor_options" in opts}


@pytest.fixture(scope="module")
def cluster() -> dict:
    return load(CLUSTER_YAML)


@pytest.fixture(scope="module")
def node_types(cluster) -> dict:
    return check(cluster)["available_node_types"]


@pytest.fixture(scope="module")
def worker_types(cluster, node_types) -> dict:
    return {name: t for name, t in node_types.items() if name != cluster["head_node_type"]}


def test_passes_ray_schema(cluster):
    check(cluster)


@pytest.mark.parametrize(
    "breakage, error",
    [
        pytest.param(lambda c: c.update(not_a_ray_field=1), jsonschema.ValidationError, id="unknown top-level key"),
        pytest.param(lambda c: c["available_node_types"]["dit_gpu"].update(gpus=1), jsonschema.ValidationError, id="unknown node-type key"),
        pytest.param(lambda c: c["available_node_types"]["dit_gpu"]["resources"].update(dit_node=0.5), jsonschema.ValidationError, id="fractional resource"),
        pytest.param(lambda c: c["available_node_types"]["thinker_gpu"].pop("node_config"), jsonschema.ValidationError, id="missing node_config"),
        pytest.param(lambda c: c.update(head_node_type="nope"), ValueError, id="head type not defined"),
        pytest.param(lambda c: c.update(max_workers=1), ValueError, id="max_workers below sum of min_workers"),
    ],
)
def test_schema_check_rejects_broken_copy(cluster, tmp_path, breakage, error):
    """The check above can fail: a broken copy of the file, written and read back, is refused."""
    broken = copy.deepcopy(cluster)
    breakage(broken)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(broken))
    with pytest.raises(error):
        check(load(path))


def test_head_has_no_gpus(cluster, node_types):
    head = node_types[cluster["head_node_type"]]
    assert head["resources"].get("GPU") == 0, "the head must declare GPU: 0 explicitly"
    assert head["resources"].get("CPU", 0) >= 1
    assert not set(head["resources"]) - BUILTIN_RESOURCES, "stage marker resources belong on GPU workers"


def test_worker_types_have_gpus_and_bounds(worker_types):
    assert {"thinker_gpu", "dit_gpu"} <= set(worker_types)
    for name, t in worker_types.items():
        assert t["resources"].get("GPU", 0) >= 1, name
        assert 0 <= t["min_workers"] <= t["max_workers"], name


@pytest.mark.parametrize("serve_yaml", [SERVE_YAML, *MULTI_GPU_YAMLS], ids=lambda p: p.name)
def test_every_requested_resource_is_on_a_gpu_worker(worker_types, serve_yaml):
    """Each stage of deployments/bagel.yaml (and of the multi-GPU DiT variants) can be placed:
    its custom resources, GPUs and CPUs fit on one worker type (all ranks of a parallel DiT
    replica on one node: its bundles are STRICT_PACK), and the types that carry its marker
    have room for its max replicas."""
    stages = stage_options(load(serve_yaml))
    assert {"thinker", "dit"} <= set(stages)
    for stage, opts in stages.items():
        actor = opts["ray_actor_options"]
        parallel = opts.get("parallel", {})
        ranks = parallel.get("cfg", 1) * parallel.get("sequence", 1)
        custom = {k: v * ranks for k, v in actor.get("resources", {}).items() if k not in BUILTIN_RESOURCES}
        if stage in ("thinker", "dit"):
            assert custom, f"{stage} must be pinned to its node type with a custom resource"
        if not custom:
            continue
        gpus = max(actor.get("num_gpus", 0), 1) * ranks
        hosts = {
            name: t
            for name, t in worker_types.items()
            if all(t["resources"].get(k, 0) >= v for k, v in custom.items())
            and t["resources"].get("GPU", 0) >= gpus
            and t["resources"].get("CPU", 0) >= actor.get("num_cpus", 1) * ranks
        }
        assert hosts, f"no GPU worker type in cluster.yaml offers {custom} with {gpus} GPU for {stage}"
        max_replicas = opts.get("autoscaling_config", {}).get("max_replicas", opts.get("num_replicas", 1))
        capacity = sum(t["max_workers"] * int(t["resources"]["GPU"] // gpus) for t in hosts.values())
        assert capacity >= max_replicas, f"{stage}: {max_replicas} replicas but room for {capacity} on {sorted(hosts)}"


@pytest.mark.parametrize("serve_yaml", MULTI_GPU_YAMLS, ids=lambda p: p.name)
def test_multi_gpu_dit_configs_are_valid_app_configs(serve_yaml):
    """The files load as app configs, and their DiT asks for one bundle per rank."""
    from bagel_ray.serve.config import AppConfig

    app = AppConfig.model_validate(load(serve_yaml)["applications"][0]["args"])
    n = int(serve_yaml.stem.removeprefix("bagel_dit").removesuffix("gpu"))
    assert app.dit.parallel.size == n
    assert len(app.dit.serve_options("DiT", 5, None)["placement_group_bundles"]) == n


def test_stage_markers_do_not_overlap(worker_types):
    """A node type carries one stage's marker, so Thinker and DiT never share a node type."""
    for name, t in worker_types.items():
        markers = {"thinker_node", "dit_node", "dit_multi_gpu_node"} & set(t["resources"])
        assert len(markers) <= 1, f"{name} carries {markers}"


def test_ray_start_commands_use_token_auth(cluster):
    """Ray 2.60 only turns token auth on for `ray start` when RAY_AUTH_MODE=token is set (a
    worker never infers it), and every node needs the token file."""
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cluster[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    assert "~/.ray/auth_token" in cluster["file_mounts"]
