"""The DiT replica of the tiny app denoises concurrent same-size image requests together, step
by step (`dit.max_batch_size` in deployments/tiny.yaml), and each gets the image it gets alone
from `LocalPipeline`; a request that goes away leaves the batch without disturbing the rest.

How equal (tests/determinism.py): a request denoised alone in the replica is the reference's
bit for bit (same machine, thread count and shapes); one denoised in a batch runs products of
more rows, which the CPU may sum in another order (this machine's MKL at one thread does not
when every step runs CFG, as here; an AVX-512 Xeon's does), so within `TOL` on the latents and
`PIXEL_TOL` on the pixels. So is a reference computed at another thread count than the replica's.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from bagel_ray.engine.request import GenerationRequest
from tests.conftest import outlasting
from tests.determinism import TOL, assert_pixels_close, other_thread_count, torch_threads, worker_thread_count
from tests.serve.conftest import replica_thread_counts


def request(i: int, steps: int) -> GenerationRequest:
    return GenerationRequest("text2img", f"a picture of thing number {i}", seed=100 + i, num_inference_steps=steps + i, height=64, width=64,
                             cfg_interval=(0.0, 1.0), cfg_img_scale=1.0 + 0.5 * (i % 2))


def assert_same(got, want) -> None:
    assert torch.equal(got.latent_tokens, want.latent_tokens)
    assert np.array_equal(np.asarray(got.image), np.asarray(want.image))


def assert_close(got, want) -> None:
    torch.testing.assert_close(got.latent_tokens, want.latent_tokens, **TOL)
    assert_pixels_close(got.image, want.image, got.prompt)


def test_concurrent_requests_are_batched_and_match_local(serve_app, local):
    reqs = [request(i, 24) for i in range(4)]
    want = [local.run(r) for r in reqs]
    calls = [serve_app.handle.generate.remote(r) for r in reqs]
    got = [c.result(timeout_s=120) for c in calls]
    for g, w in zip(got, want):
        assert_close(g, w)
    assert max(g.timings["denoise_batch"] for g in got) > 1, [g.timings for g in got]


def test_a_reference_at_another_thread_count_is_within_tolerance(serve_app, local):
    """What a machine whose test process and replicas run other thread counts sees: the request
    alone is bit for bit the reference at the replica's count, and within tolerance of one
    computed at another count (whose products split their sums otherwise)."""
    req = request(5, 24)
    got = serve_app.handle.generate.remote(req).result(timeout_s=120)
    assert got.timings["denoise_batch"] == 1
    assert replica_thread_counts(serve_app.name, "DiT") == [worker_thread_count()]  # what `local` runs at
    assert_same(got, local.run(req))
    with torch_threads(other_thread_count()):
        assert_close(got, local.run(req))


def test_a_cancelled_request_leaves_the_batch_and_the_others_finish(serve_app, local):
    from ray.serve.exceptions import RequestCancelledError

    long = serve_app.handle.generate.remote(outlasting(request(9, 12), 20000))  # minutes of steps if left running
    time.sleep(1.0)
    reqs = [request(i, 12) for i in range(3)]
    want = [local.run(r) for r in reqs]
    got = [c.result(timeout_s=120) for c in [serve_app.handle.generate.remote(r) for r in reqs]]
    for g, w in zip(got, want):
        assert g.timings["denoise_batch"] > 1  # denoised beside the long one
        assert_close(g, w)
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
