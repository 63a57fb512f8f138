"""deployments/rayservice.yaml (KubeRay's RayService): its serveConfigV2 is deployments/bagel.yaml
and passes our own config validator; its worker groups give each stage the resources the Serve
config asks for, and match cluster.yaml's node types.

KubeRay's CRD schema is published with the operator (a Go module and Helm chart), not in any
PyPI package, so the manifest is checked here against the parts of the CRD it relies on (the
field names, `rayStartParams` being a map of strings) and against our own configs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from bagel_ray.serve.config import AppConfig
from bagel_ray.serve.deploy import AppSpec, DeployError
from tests.conftest import REPO_ROOT

MANIFEST = REPO_ROOT / "deployments" / "rayservice.yaml"
SERVE_YAML = REPO_ROOT / "deployments" / "bagel.yaml"
CLUSTER_YAML = REPO_ROOT / "cluster.yaml"
BUILTIN = {"CPU", "GPU"}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def start_resources(params: dict[str, str]) -> dict[str, float]:
    """What `ray start` advertises for a group's rayStartParams: CPU, GPU and the custom
    resources (KubeRay passes `resources` on as `--resources=<value>`, a quoted JSON map)."""
    found = {"CPU": float(params.get("num-cpus", 0)), "GPU": float(params.get("num-gpus", 0))}
    if "resources" in params:
        found.update(json.loads(json.loads(params["resources"])))
    return found


def app_spec(manifest: dict, tmp_path: Path) -> AppSpec:
    path = tmp_path / "serveConfigV2.yaml"
    path.write_text(manifest["spec"]["serveConfigV2"])
    return AppSpec.from_file(path)


def shape_problems(manifest: dict) -> list[str]:
    """The CRD fields the manifest relies on, as KubeRay's ray.io/v1 schema names them."""
    problems = []
    if manifest.get("apiVersion") != "ray.io/v1" or manifest.get("kind") != "RayService":
        problems.append("not a ray.io/v1 RayService")
    spec = manifest.get("spec", {})
    if not isinstance(spec.get("serveConfigV2"), str):
        problems.append("spec.serveConfigV2 must be a string (a Serve config file's text)")
    cluster = spec.get("rayClusterConfig", {})
    groups = [("headGroupSpec", cluster.get("headGroupSpec", {}))]
    groups += [(f"workerGroupSpecs[{i}]", g) for i, g in enumerate(cluster.get("workerGroupSpecs", []))]
    for where, group in groups:
        params = group.get("rayStartParams", {})
        bad = sorted(k for k, v in params.items() if not isinstance(v, str))
        if bad:
            problems.append(f"{where}.rayStartParams: values must be strings ({', '.join(bad)})")
        if not group.get("template", {}).get("spec", {}).get("containers"):
            problems.append(f"{where}.template.spec.containers is missing")
    for i, group in enumerate(cluster.get("workerGroupSpecs", [])):
        if not group.get("groupName"):
            problems.append(f"workerGroupSpecs[{i}].groupName is missing")
        if not group.get("minReplicas", 0) <= group.get("replicas", 0) <= group.get("maxReplicas", 0):
            problems.append(f"workerGroupSpecs[{i}]: needs minReplicas <= replicas <= maxReplicas")
    return problems


def resource_problems(manifest: dict, config: AppConfig) -> list[str]:
    """Each stage fits on exactly the worker group that carries its marker resources, as many
    replicas as it may scale to fit the group at its largest, and each container's GPU limit is
    what its `ray start` advertises. The head has no GPU."""
    problems = []
    cluster = manifest["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    if start_resources(head["rayStartParams"])["GPU"] != 0:
        problems.append("the head must advertise no GPU")
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    for name, group in groups.items():
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        if float(limits.get("nvidia.com/gpu", 0)) != start_resources(group["rayStartParams"])["GPU"]:
            problems.append(f"{name}: the container's nvidia.com/gpu limit differs from its num-gpus")
    for stage_name in ("thinker", "dit"):
        stage = getattr(config, stage_name)
        opts = stage.ray_actor_options
        markers = {k: v for k, v in opts.resources.items() if k not in BUILTIN}
        hosts = [n for n, g in groups.items() if all(start_resources(g["rayStartParams"]).get(k, 0) >= v for k, v in markers.items())]
        if len(hosts) != 1:
            problems.append(f"{stage_name}: {len(hosts)} worker groups carry its resources {markers}, want 1")
            continue
        group = groups[hosts[0]]
        node = start_resources(group["rayStartParams"])
        if node["CPU"] < opts.num_cpus or node["GPU"] < opts.num_gpus:
            problems.append(f"{stage_name}: a {hosts[0]} node ({node}) cannot hold one replica")
            continue
        per_node = int(min(node["GPU"] / opts.num_gpus if opts.num_gpus else float("inf"), node["CPU"] / opts.num_cpus if opts.num_cpus else float("inf")))
        most = stage.num_replicas if stage.num_replicas is not None else stage.autoscaling_config.max_replicas
        if per_node * group["maxReplicas"] < most:
            problems.append(f"{stage_name}: up to {most} replicas, but {hosts[0]} holds {per_node * group['maxReplicas']}")
    return problems


def cluster_problems(manifest: dict, cluster_yaml: dict) -> list[str]:
    """The worker groups are cluster.yaml's worker types: same resources and bounds."""
    problems = []
    types = {n: t for n, t in cluster_yaml["available_node_types"].items() if n != cluster_yaml["head_node_type"]}
    for group in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        have = start_resources(group["rayStartParams"])
        twins = [n for n, t in types.items() if {k: float(v) for k, v in t["resources"].items()} == have]
        if len(twins) != 1:
            problems.append(f"{group['groupName']}: no cluster.yaml worker type with resources {have}")
            continue
        t = types[twins[0]]
        if (t["min_workers"], t["max_workers"]) != (group["minReplicas"], group["maxReplicas"]):
            problems.append(f"{group['groupName']}: bounds differ from cluster.yaml's {twins[0]}")
    head = cluster_yaml["available_node_types"][cluster_yaml["head_node_type"]]["resources"]
    if {k: float(v) for k, v in head.items()} != start_resources(manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]):
        problems.append("the head group differs from cluster.yaml's head")
    return problems


@pytest.fixture(scope="module")
def manifest() -> dict:
    return load(MANIFEST)


def test_manifest_has_the_crd_fields_it_relies_on(manifest):
    assert shape_problems(manifest) == []


def test_serve_config_is_bagel_yaml_and_validates(manifest, tmp_path):
    assert yaml.safe_load(manifest["spec"]["serveConfigV2"]) == load(SERVE_YAML)
    spec = app_spec(manifest, tmp_path)
    assert spec.name == "bagel" and spec.config.thinker.ray_actor_options.resources == {"thinker_node": 0.001}


def test_worker_groups_hold_what_the_stages_ask_for(manifest, tmp_path):
    assert resource_problems(manifest, app_spec(manifest, tmp_path).config) == []


def test_worker_groups_are_cluster_yaml_node_types(manifest):
    assert cluster_problems(manifest, load(CLUSTER_YAML)) == []


def test_ray_version_is_the_one_we_run(manifest):
    import ray

    assert manifest["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    assert f"ray[default,serve]=={ray.__version__}" in CLUSTER_YAML.read_text()


def _groups(m):
    return m["spec"]["rayClusterConfig"]["workerGroupSpecs"]


@pytest.mark.parametrize("breakage, check", [
    pytest.param(lambda m: _groups(m)[1]["rayStartParams"].update(resources='"{\\"dit\\": 1}"'), "resources", id="DiT marker renamed"),
    pytest.param(lambda m: _groups(m)[1].update(maxReplicas=4), "resources", id="DiT group smaller than its autoscaling"),
    pytest.param(lambda m: _groups(m)[0]["template"]["spec"]["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu"), "resources",
                 id="GPU limit missing"),
    pytest.param(lambda m: m["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"].update({"num-gpus": "1"}), "resources",
                 id="GPU on the head"),
    pytest.param(lambda m: _groups(m)[0]["rayStartParams"].update({"num-gpus": 1}), "shape", id="non-string start param"),
    pytest.param(lambda m: _groups(m)[0].update(replicas=5), "shape", id="replicas past maxReplicas"),
    pytest.param(lambda m: _groups(m)[0].update(minReplicas=0), "cluster", id="bounds differ from cluster.yaml"),
])
def test_checks_refuse_a_broken_copy(manifest, tmp_path, breakage, check):
    broken = copy.deepcopy(manifest)
    breakage(broken)
    if check == "shape":
        assert shape_problems(broken)
    elif check == "cluster":
        assert cluster_problems(broken, load(CLUSTER_YAML))
    else:
        assert resource_problems(broken, app_spec(broken, tmp_path).config)


def test_a_bad_serve_config_fails_our_validator(manifest, tmp_path):
    broken = copy.deepcopy(manifest)
    broken["spec"]["serveConfigV2"] = broken["spec"]["serveConfigV2"].replace("max_batch_size: 8", "max_batch_size: 0")
    with pytest.raises(DeployError, match="max_batch_size"):
        app_spec(broken, tmp_path)
