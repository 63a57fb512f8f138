"""`benchmarks/bench_attention_plans.py` runs (its CPU smoke mode) and reports both kernel choices for every shape."""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks.bench_attention_plans import CASES
from tests.conftest import REPO_ROOT


def test_it_runs_and_reports_both_ways_for_every_shape(tmp_path):
    out = tmp_path / "plans.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_attention_plans", "--smoke", "--json", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {f"{name}_{way}" for name, *_ in CASES for way in ("default", "flash")}
    assert all(r["steady_us"] > 0 and len(r["all_first_calls_ms"]) == 3 for r in rows.values())
