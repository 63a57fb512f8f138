"""`benchmarks/bench_png.py` runs (small images, one repetition) and reports both encoders."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_it_runs_and_reports_both_encoders(tmp_path):
    out = tmp_path / "png.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_png", "--sides", "64", "--reps", "1", "--json", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"png_noise_64", "png_smooth_64"}
    assert all(r["seconds"] > 0 and r["pil_seconds"] > 0 and r["bytes"] > 0 for r in rows.values())
