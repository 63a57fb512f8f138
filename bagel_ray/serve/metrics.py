"""Prometheus metrics through Ray's metrics API (exported on each node's metrics port).

Created lazily, once per process, so importing this module costs nothing and works outside
a Ray worker (the helpers then do nothing)."""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the ingress counts its requests here and imports no torch
    from bagel_ray.transport.base import TransferStats

_LATENCY_BOUNDS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60, 120]


@lru_cache(maxsize=None)
def _metrics():
    import ray
    from ray.util import metrics

    if not ray.is_initialized():
        return None
    return {
        "requests": metrics.Counter("bagel_requests_total", "Requests by modality and status.", tag_keys=("modality", "status")),
        "request_latency": metrics.Histogram("bagel_request_latency_s", "End-to-end latency at the driver.", _LATENCY_BOUNDS, tag_keys=("modality",)),
        "queue_wait": metrics.Histogram("bagel_queue_wait_s", "Time from arrival to the first stage call.", _LATENCY_BOUNDS),
        "stage_latency": metrics.Histogram("bagel_stage_latency_s", "Time a request spends in a stage replica.", _LATENCY_BOUNDS, tag_keys=("stage",)),
        "steps": metrics.Counter("bagel_denoise_steps_total", "Denoising steps run."),
        "handoff_bytes": metrics.Counter("bagel_kv_handoff_bytes_total", "KV context bytes handed to the DiT, by the DiT rank that got them.",
                                         tag_keys=("rank",)),
        "handoffs": metrics.Counter("bagel_kv_handoffs_total", "KV handoffs by the route taken, whether they crossed nodes and the DiT rank that took them.",
                                    tag_keys=("route", "crossed_nodes", "rank")),
        "handoff_seconds": metrics.Histogram("bagel_kv_handoff_s", "Pack plus unpack time of one KV handoff.", [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5]),
    }


def count_request(modality: str, status: str, latency_s: float) -> None:
    m = _metrics()
    if m:
        m["requests"].inc(tags={"modality": modality, "status": status})
        m["request_latency"].observe(latency_s, tags={"modality": modality})


def observe_queue_wait(seconds: float) -> None:
    m = _metrics()
    if m:
        m["queue_wait"].observe(seconds)


def observe_stage(stage: str, seconds: float) -> None:
    m = _metrics()
    if m:
        m["stage_latency"].observe(seconds, tags={"stage": stage})


def count_step() -> None:
    m = _metrics()
    if m:
        m["steps"].inc()


def observe_handoff(stats: TransferStats, crossed_nodes: bool, rank: int = 0) -> None:
    """One rank's receipt of a handoff: rank 0 (every DiT replica's own process) for the
    whole contexts, a worker rank of a parallel replica for the share it fetched itself (a
    share rank 0 relays over the group is not a handoff). The time is rank 0's only."""
    m = _metrics()
    if m:
        m["handoffs"].inc(tags={"route": stats.route, "crossed_nodes": str(crossed_nodes).lower(), "rank": str(rank)})
        if stats.nbytes:  # a rank whose one branch is an empty context (cfg_text without a system prompt) gets none
            m["handoff_bytes"].inc(stats.nbytes, tags={"rank": str(rank)})
        if rank == 0:
            m["handoff_seconds"].observe(stats.send_s + stats.receive_s)


def metrics_location(configured: int | None = None) -> str:
    """Where this node's Prometheus metrics are, said at start-up since nothing else says it.
    Ray picks the port at random unless the node was started with one (`bagel-ray serve`
    starts its Ray with the config's `metrics_export_port`; `ray start --metrics-export-port`
    on a cluster), so a port other than the configured one is said too."""
    import ray

    try:
        node_id = ray.get_runtime_context().get_node_id()
        node = next(n for n in ray.nodes() if n.get("NodeID") == node_id)
        port = node["MetricsExportPort"]
        where = f"metrics at http://{node['NodeManagerAddress']}:{port}/metrics"
    except Exception as exc:  # informative only: never stop the app for it
        return f"metrics port unknown ({type(exc).__name__})"
    if configured is not None and port != configured:
        where += (f" (not the configured metrics_export_port {configured}: this node was started without "
                  f"--metrics-export-port {configured})")
    return where
