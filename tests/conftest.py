"""Shared test fixtures: where the golden files of the official code live.

One setting, `BAGEL_RAY_GOLDEN` (default `../shared/golden` next to the repository), points at
them; tests that need them skip with a clear reason when the folder is absent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
GOLDEN_ROOT = Path(os.environ.get("BAGEL_RAY_GOLDEN", REPO_ROOT.parent / "shared" / "golden"))
TINY_GOLDEN = GOLDEN_ROOT / "bagel-tiny"


def outlasting(req, num_inference_steps: int):
    """`req` with more denoising steps than a client may ask for (the knob's limit is 500): a
    job that outlasts its test, for tests that cancel it. Set after the request's checks, as
    no client can; the engines take any count."""
    object.__setattr__(req, "num_inference_steps", num_inference_steps)
    return req


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
def one_thread():
    """One intra-op thread, as a Ray worker or replica has: the CPU's convolutions and matmuls
    sum in a thread-count dependent order, and these tests compare outputs bit for bit."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
