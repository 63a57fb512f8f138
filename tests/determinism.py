"""What two computations of one request may be expected to share, and at which torch thread
count the tests run the Ray workers and the references they are compared with.

Bit for bit: on one machine, with the same torch thread count and the same shapes (the request
alone on both sides, or in the same batch), in one process or two. The CPU's GEMMs and
convolutions are deterministic then, but how they split and sum a product depends on its shapes,
on the number of threads and on the CPU's kernels, which MKL picks by CPU model (issue 18: an
AVX-512 Xeon gave other last digits for batches that this machine's AMD EPYC computes like the
request alone). So a request denoised in a batch with others (a DiT replica, a bulk job's DiT
stage, a retry that lands in another batch), or at another thread count, agrees with the request
alone within `TOL` on its latents (~2e-6 seen here after 100 steps) and within `PIXEL_TOL` on its
8-bit pixels (a decoded value at a rounding boundary goes one way or the other). A request that
took another one's rows, or other noise, is off by far more.

The thread count: Ray gives a worker or Serve replica of a fractional CPU OMP_NUM_THREADS=1,
and keeps OMP_NUM_THREADS where the environment already sets it; the references pin the same
count (`worker_thread_count`). `BAGEL_RAY_TORCH_THREADS=N python -m pytest ...` runs the suite
as on a machine where that count is N: tests/conftest.py sets OMP_NUM_THREADS=N for the session,
which every Ray cluster the tests start passes on to its workers. `MKL_CBWR=COMPATIBLE` on top
makes MKL use its baseline kernels everywhere, which give other last digits for other row counts
where this CPU's do not: another batch composition, as on another CPU.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import numpy as np

# rtol = atol = 1e-5 on latents: the DiT's batched-vs-alone bound (tests/engine/test_dit_batch.py)
TOL = {"rtol": 1e-5, "atol": 1e-5}
# 8-bit pixels of images whose latents agree within TOL: one level either way
PIXEL_TOL = 1
THREADS_VAR = "BAGEL_RAY_TORCH_THREADS"


def worker_thread_count() -> int:
    """The intra-op threads torch has in the Ray workers and replicas the tests start (all of a
    fractional CPU): OMP_NUM_THREADS where it is set, as Ray keeps it, else Ray's 1."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(value) if value.isdigit() and int(value) > 0 else 1


def other_thread_count() -> int:
    """A thread count other than the workers', for a reference that must differ from them."""
    return 2 if worker_thread_count() == 1 else 1


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the body at `n` intra-op threads (torch's count is the process's, for every thread)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def assert_pixels_close(got, want, msg: str = "") -> None:
    """Two 8-bit images (PIL images or arrays) of one request computed in different batches,
    at different thread counts or on different CPUs: the same shape, and every channel within
    `PIXEL_TOL`."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{msg}: shape {got.shape} != {want.shape}"
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= PIXEL_TOL, f"{msg}: {int((diff > PIXEL_TOL).sum())} channels off by up to {diff.max()}"
