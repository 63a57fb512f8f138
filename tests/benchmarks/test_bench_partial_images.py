"""`benchmarks/bench_partial_images.py` runs in its CPU smoke mode and reports both cases."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_it_runs_and_reports_the_overhead(tmp_path):
    out = tmp_path / "partial.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_partial_images", "--smoke", "--steps", "6",
                           "--reps", "1", "--json", str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"t2i32_no_previews", "t2i32_3_previews"}
    assert rows["t2i32_no_previews"]["previews"] == 0 and rows["t2i32_3_previews"]["previews"] == 3
    assert all(r["seconds"] > 0 for r in rows.values()) and "overhead_pct" in rows["t2i32_3_previews"]
