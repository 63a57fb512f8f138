"""`benchmarks/time_to_ready.py` end to end in --smoke mode: the tiny random checkpoint written,
evicted from the page cache, served by the real `serve run` CLI in its own local Ray, probed
over HTTP, stopped (nothing left running) and loaded in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from benchmarks.time_to_ready import evict, resident_fraction
from tests.conftest import REPO_ROOT


def test_resident_fraction_sees_a_read_file(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(1 << 20))
    path.read_bytes()
    assert resident_fraction([path]) == 1.0
    assert evict([path], drop_all=False).startswith("posix_fadvise(DONTNEED)")
    assert 0.0 <= resident_fraction([path]) <= 1.0


def test_smoke_run(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.time_to_ready", "--smoke", "--dir", str(tmp_path / "model"), "--json", str(out),
         "--timeout", "240"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=420,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    ready = result["ready"]
    assert 0 < ready["ray_started"] <= ready["config_submitted"] <= ready["app_running"] <= ready["ready"]
    assert ready["ready"] == max(ready["health_200"], ready["app_running"])
    assert result["checkpoint"]["written"] and result["checkpoint"]["size"] == "tiny"
    assert result["page_cache"]["evicted_by"].startswith("posix_fadvise")
    assert result["probe"]["text2text_tokens"] > 0
    assert set(result["pure_load"]) == {"thinker", "dit"}
    assert result["pure_load"]["dit"]["bytes"] > result["pure_load"]["thinker"]["bytes"]
    try:
        os.kill(result["serve_run_pid"], 0)
    except ProcessLookupError:
        pass
    else:
        raise AssertionError("serve run is still running")
    assert "| tiny random |" in proc.stdout
