"""The DiT replica of the tiny app denoises concurrent same-size image requests together, step
by step (`dit.max_batch_size` in deployments/tiny.yaml), and each gets the image it gets alone
from `LocalPipeline`; a request that goes away leaves the batch without disturbing the rest.

The requests run CFG at every step (cfg_interval [0, 1]), so every GEMM of a step has four rows
or more, where batched and alone agree bit for bit on the CPU (tests/engine/test_dit_batch.py).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from bagel_ray.engine.request import GenerationRequest
from tests.conftest import outlasting


def request(i: int, steps: int) -> GenerationRequest:
    return GenerationRequest("text2img", f"a picture of thing number {i}", seed=100 + i, num_inference_steps=steps + i, height=64, width=64,
                             cfg_interval=(0.0, 1.0), cfg_img_scale=1.0 + 0.5 * (i % 2))


def assert_same(got, want) -> None:
    assert torch.equal(got.latent_tokens, want.latent_tokens)
    assert np.array_equal(np.asarray(got.image), np.asarray(want.image))


def test_concurrent_requests_are_batched_and_match_local(serve_app, local):
    reqs = [request(i, 24) for i in range(4)]
    want = [local.run(r) for r in reqs]
    calls = [serve_app.handle.generate.remote(r) for r in reqs]
    got = [c.result(timeout_s=120) for c in calls]
    for g, w in zip(got, want):
        assert_same(g, w)
    assert max(g.timings["denoise_batch"] for g in got) > 1, [g.timings for g in got]


def test_a_cancelled_request_leaves_the_batch_and_the_others_finish(serve_app, local):
    from ray.serve.exceptions import RequestCancelledError

    long = serve_app.handle.generate.remote(outlasting(request(9, 12), 20000))  # minutes of steps if left running
    time.sleep(1.0)
    reqs = [request(i, 12) for i in range(3)]
    want = [local.run(r) for r in reqs]
    got = [c.result(timeout_s=120) for c in [serve_app.handle.generate.remote(r) for r in reqs]]
    for g, w in zip(got, want):
        assert g.timings["denoise_batch"] > 1  # denoised beside the long one
        assert_same(g, w)
    long.cancel()
    with pytest.raises(RequestCancelledError):
        long.result(timeout_s=30)
    for _ in range(10):  # the cancellation reaches the DiT replica's batch within a step or two
        after = serve_app.handle.generate.remote(reqs[0]).result(timeout_s=60)
        if after.timings["denoise_batch"] == 1:
            break
        time.sleep(0.5)
    assert after.timings["denoise_batch"] == 1  # alone: the long one has gone
    assert_same(after, want[0])
