"""The Grafana dashboard (deployments/grafana/bagel-ray.json) queries only what the app
exports: every panel's metrics, with the labels it groups or filters by, are on the live
`/metrics` of the session's tiny app once each kind of request has run."""

from __future__ import annotations

import json
import re
import time

import requests

from tests.conftest import REPO_ROOT
from tests.serve.test_metrics import scrape

DASHBOARD = REPO_ROOT / "deployments" / "grafana" / "bagel-ray.json"
METRIC = re.compile(r"\bray_bagel_\w+")
GROUPED = re.compile(r"by \(([^)]*)\)")
FILTERED = re.compile(r"\{([^}]*)\}")


def queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert panels and all(p["targets"] for p in panels)
    return [t["expr"] for p in panels for t in p["targets"]]


def test_every_panel_query_matches_the_live_metrics(serve_app, ray_session):
    url = serve_app.url
    assert requests.post(url + "/v1/images/generations", json={"prompt": "x", "size": "32x32", "num_inference_steps": 3},
                         timeout=120).status_code == 200  # text2img: the Thinker, the KV handoff, the DiT
    assert requests.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
                         timeout=120).status_code == 422  # refused at the ingress
    wanted = {}  # metric -> labels the queries use on it
    for expr in queries():
        names = METRIC.findall(expr)
        assert names, expr
        labels = {l.strip() for group in GROUPED.findall(expr) for l in group.split(",")} - {"le", ""}
        labels |= {pair.split("=")[0].strip() for f in FILTERED.findall(expr) for pair in f.split(",")}
        for name in names:
            wanted.setdefault(name, set()).update(labels)
    deadline = time.monotonic() + 60
    while True:
        lines = scrape(ray_session).splitlines()
        missing = {name: sorted(labels - {l for line in lines if line.startswith(name + "{")
                                          for l in re.findall(r"(\w+)=\"", line)})
                   for name, labels in wanted.items()}
        missing = {k: v for k, v in missing.items() if v or not any(line.startswith(k) for line in lines)}
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not missing, missing


def test_the_driver_says_where_its_metrics_are(serve_app, ray_session):
    from pathlib import Path

    logs = Path(ray_session._private.worker._global_node.get_logs_dir_path()) / "serve"
    port = ray_session._private.worker.global_worker.node.metrics_export_port
    text = "".join(f.read_text() for f in logs.glob(f"replica_{serve_app.name}_Driver_*.log"))
    assert re.search(rf"metrics at http://[\w.]+:{port}/metrics", text), text[-2000:]
    # this session's Ray was started without the config's port: the line says so
    configured = serve_app.args["metrics_export_port"]
    note = f"not the configured metrics_export_port {configured}: this node was started without --metrics-export-port"
    assert (note in text) == (port != configured), text[-2000:]
