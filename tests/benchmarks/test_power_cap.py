"""`benchmarks/power_cap.py`: its CPU smoke run times every phase, and the `nvidia-smi` samples
(here from a stand-in that prints the same CSV) land in the phases they were taken in."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO_ROOT

FAKE_SMI = """#!/bin/sh
# prints what `nvidia-smi --query-gpu=... --format=csv,noheader,nounits -lms 50` prints
while true; do
  echo "$(date +'%Y/%m/%d %H:%M:%S.%3N'), 1350, 697.5, 0x0000000000000004"
  sleep 0.05
done
"""


def test_smoke_run_times_every_phase_and_reads_the_samples(tmp_path):
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text(FAKE_SMI)
    smi.chmod(0o755)
    out = tmp_path / "power.json"
    env = dict(os.environ, PATH=f"{smi.parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.power_cap", "--smoke", "--json", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["phase"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["t2i1024 step (2 branches)", "its attention call alone", "GEMM 256³", "idle"]
    assert all(r["ms_per_call"] > 0 for r in rows.values())
    idle = rows["idle"]  # 10 x 50 ms of sleep: the stand-in prints every 50 ms meanwhile
    assert idle["ms_per_call"] >= 50 and idle["samples"] >= 3, idle
    for r in (r for r in rows.values() if r["samples"]):
        assert r["sm_mhz"] == 1350 and r["watts"] == 697.5 and r["throttle_reasons"] == ["0x0000000000000004"]
    assert "| GEMM 256³ |" in proc.stdout
