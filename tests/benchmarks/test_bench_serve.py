"""`benchmarks/bench_serve.py --smoke`: every row of the Serve benchmark through the tiny app on
the CPU (its own local Ray, shut down at the end), so the script that records the Serve figures,
the TaylorSeer row beside the exact one included, cannot rot unnoticed."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_smoke_run_has_every_row(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_serve", "--smoke", "--json", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["row"]: r for r in result["rows"]}
    assert result["smoke"] is True
    assert set(rows) == {"ready_tiny", "t2i512_serve", "t2i512_serve_new_lengths", "t2i512_8clients", "t2i512_8clients_taylorseer",
                         "edit512_serve", "decode_b1_serve", "decode_32streams_serve"}
    exact, cached = rows["t2i512_8clients"], rows["t2i512_8clients_taylorseer"]
    assert cached["exact_images_per_s"] == exact["images_per_s"] > 0
    assert cached["speedup"] == exact["seconds"] / cached["seconds"]
    # the knob reached the DiT: the same seeds give other (approximated) images
    assert 0 < cached["pixel_mean_abs_diff_vs_exact"] < 255
    assert rows["decode_32streams_serve"]["tokens"] > 0
    assert "| t2i512_8clients_taylorseer |" in proc.stdout
