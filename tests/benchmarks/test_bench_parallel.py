"""`benchmarks/bench_parallel.py --smoke`: the multi-GPU benchmark's rows run on CPU ranks over
gloo with the tiny config (4 ranks: CFG 2 with and without help for cond, sequence 2, both, CFG 3
for the edit; not cfg 2 x sequence 4: the tiny model has 2 KV heads), and its
correctness guard holds, so the script behind issue 21's table cannot rot unnoticed."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_smoke_run_has_every_row_within_the_guard(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_parallel", "--smoke", "--reps", "1", "--steps", "3",
                           "--json", str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["row"]: r for r in report["results"]}
    assert report["ranks"] == 4
    assert set(rows) == {"t2i1024_1gpu", "t2i1024_cfg2", "t2i1024_cfg2_idle", "t2i1024_seq2", "t2i1024_cfg2_seq2",
                         "edit1024_1gpu", "edit1024_cfg3"}
    for name, row in rows.items():
        assert row["ranks"] == {"1gpu": 1, "cfg2": 2, "cfg2_idle": 2, "seq2": 2, "cfg2_seq2": 4, "cfg3": 3}[name.split("_", 1)[1]]
        if row["ranks"] > 1:
            assert row["guard_ok"] is True, row
            # fp32 on the CPU: the split rows agree with the one-process path far below the bf16 floor
            assert row["latent_rel_l2"] < 1e-4 and row["floor_rel_l2"] > 1e-4, row
    # cond over both ranks outside cfg_interval where the tiny heads (4 / 2) divide by the ranks
    assert rows["t2i1024_cfg2"]["help_cond"] and not rows["t2i1024_cfg2_idle"]["help_cond"]
    assert not rows["t2i1024_cfg2_seq2"]["help_cond"] and not rows["edit1024_cfg3"]["help_cond"]


def test_unknown_rows_are_refused():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_parallel", "--smoke", "--rows", "t2i1024_cfg9"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown rows ['t2i1024_cfg9']" in proc.stderr
