"""The app's metrics reach Prometheus's endpoint (Ray's per-node metrics export port)."""

from __future__ import annotations

import time

import requests


def scrape(ray_session) -> str:
    port = ray_session._private.worker.global_worker.node.metrics_export_port
    return requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def test_metrics_are_exported(serve_app, ray_session):
    ok = requests.post(serve_app.url + "/v1/images/generations", json={"prompt": "x", "size": "32x32", "num_inference_steps": 3}, timeout=120)
    assert ok.status_code == 200
    chat = requests.post(serve_app.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, timeout=120)
    assert chat.status_code == 200
    wanted = ("ray_bagel_requests_total", "ray_bagel_stage_latency_s", "ray_bagel_denoise_steps_total",
              "ray_bagel_queue_wait_s", "ray_bagel_request_latency_s")
    # Wait for this test's own requests, not just the names (an earlier test's requests may have
    # exported them already, while the chat's count is still on its way).
    deadline = time.monotonic() + 60
    while True:
        text = scrape(ray_session)
        missing = [name for name in wanted if name not in text]
        requests_lines = [l for l in text.splitlines() if l.startswith("ray_bagel_requests_total")]
        counted = (any('modality="text2img"' in l and 'status="ok"' in l for l in requests_lines)
                   and any('modality="text2text"' in l for l in requests_lines))
        if (not missing and counted) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not missing, f"not exported: {missing}"
    assert any('modality="text2img"' in l and 'status="ok"' in l for l in requests_lines)
    assert any('modality="text2text"' in l for l in requests_lines), requests_lines
    assert any(l.startswith("ray_bagel_stage_latency_s") and 'stage="dit"' in l for l in text.splitlines())
