"""`benchmarks/profile_steps.py --smoke`: every case of the step profiler runs on the CPU with the
tiny config and prints its table, so the script behind RESULTS.md's breakdowns cannot rot."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_smoke_run_prints_every_case():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.profile_steps", "--smoke", "--top", "3"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for heading in ("== decode batch 1:", "== decode batch 32:", "== t2i512 denoising step (2 branches)",
                    "== edit512 denoising step (3 branches)"):
        assert heading in proc.stdout, proc.stdout[-3000:]
    assert "vae:" in proc.stdout and "vit:" in proc.stdout  # the edit's context parts, timed
