"""Shared test fixtures: where the golden files of the official code live, and the torch thread
count of the Ray workers the tests start.

One setting, `BAGEL_RAY_GOLDEN` (default `../shared/golden` next to the repository), points at
the golden files; tests that need them skip with a clear reason when the folder is absent.
`BAGEL_RAY_TORCH_THREADS=N` runs the Ray workers and the references compared with them at N
threads (tests/determinism.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.determinism import THREADS_VAR, torch_threads, worker_thread_count

REPO_ROOT = Path(__file__).resolve().parent.parent
GOLDEN_ROOT = Path(os.environ.get("BAGEL_RAY_GOLDEN", REPO_ROOT.parent / "shared" / "golden"))
TINY_GOLDEN = GOLDEN_ROOT / "bagel-tiny"


def outlasting(req, num_inference_steps: int):
    """`req` with more denoising steps than a client may ask for (the knob's limit is 500): a
    job that outlasts its test, for tests that cancel it. Set after the request's checks, as
    no client can; the engines take any count."""
    object.__setattr__(req, "num_inference_steps", num_inference_steps)
    return req


def pytest_configure(config) -> None:
    """`BAGEL_RAY_TORCH_THREADS=N`: OMP_NUM_THREADS=N for this process and everything it starts
    (Ray keeps it for its workers instead of giving them one thread)."""
    if os.environ.get(THREADS_VAR):
        threads = os.environ[THREADS_VAR]
        if not threads.isdigit() or int(threads) < 1:
            raise pytest.UsageError(f"{THREADS_VAR} must be a thread count >= 1, not {threads!r}")
        os.environ["OMP_NUM_THREADS"] = threads


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not (TINY_GOLDEN / "manifest.json").exists():
        pytest.skip(f"golden files not found at {TINY_GOLDEN} (set BAGEL_RAY_GOLDEN to the folder holding bagel-tiny/)")
    return TINY_GOLDEN


@pytest.fixture(scope="session")
def manifest(golden_dir: Path) -> dict:
    return json.loads((golden_dir / "manifest.json").read_text())


@pytest.fixture(scope="session")
def golden_model_dir(golden_dir: Path) -> Path:
    return golden_dir / "model"


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    """The embedded tiny model in float32 on the CPU, in one process (shared by the unit tests)."""
    from bagel_ray.engine.pipeline import LocalPipeline
    from bagel_ray.model.tiny import make_tiny_model

    return LocalPipeline.from_pretrained(make_tiny_model(tmp_path_factory.mktemp("tiny")), dtype="float32")


@pytest.fixture(scope="session")
def gpu_pipeline(tmp_path_factory):
    """The embedded tiny model in bfloat16 on a CUDA GPU (the CUDA graph tests); skips without one."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from bagel_ray.engine.pipeline import LocalPipeline
    from bagel_ray.model.tiny import make_tiny_model

    return LocalPipeline.from_pretrained(make_tiny_model(tmp_path_factory.mktemp("tiny-gpu")), device="cuda",
                                         dtype="bfloat16")


@pytest.fixture(scope="session")
def image():
    """A 80x64 random picture (an input for ViT and VAE blocks)."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 80, 3), dtype=np.uint8))


@pytest.fixture
def worker_threads():
    """The Ray workers' intra-op thread count (1, or `BAGEL_RAY_TORCH_THREADS`) for the test: the
    CPU's convolutions and matmuls sum in a thread-count dependent order, and a result computed
    here is bit for bit a worker's only at the same count."""
    with torch_threads(worker_thread_count()):
        yield
