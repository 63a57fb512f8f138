"""A Ray for the transport tests: the session's one (tests/serve/conftest.py) when it is already
up, else a small local one started here and shut down after the last transport test."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="package")
def ray_local():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        yield ray
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
