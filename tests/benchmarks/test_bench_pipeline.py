"""`benchmarks/bench_pipeline.py --smoke`: every row of the GPU benchmark runs on the CPU with the
tiny config, so the script that records the performance figures cannot rot unnoticed."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_smoke_run_has_every_row(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_pipeline", "--smoke", "--reps", "1", "--json", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["row"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) >= {"forward", "guard", "t2i512", "t2i1024", "edit512", "edit1024", "dit_batch", "decode_b1", "decode_b32",
                         "decode_cli_b1", "dit_graphs_t2i512", "dit_graphs_edit512", "taylorseer_t2i1024",
                         "taylorseer_t2i512", "taylorseer_edit512"}
    assert rows["dit_graphs_t2i512"]["latent_max_abs_diff"] == 0.0  # on the CPU both are the eager forward
    batch = rows["dit_batch"]
    # the tiny model in fp32 on the CPU: batched latents agree with each request alone
    assert batch["batch4_max_abs_diff"] < 1e-4 and batch["batch8_max_abs_diff"] < 1e-4
    assert rows["guard"]["decode_same_ids"] is True
    # the step cache: 19 + 17 of 49 + 41 branch forwards (notebook t2i, 50 steps); 9 + 8 of 19 + 16
    # (20 steps, cfg_img equal to gen and reused); 3 x 9 of 3 x 19 (edit, 20 steps)
    counts = {name: (rows[f"taylorseer_{name}"]["full_forwards"], rows[f"taylorseer_{name}"]["exact_forwards"])
              for name in ("t2i1024", "t2i512", "edit512")}
    assert counts == {"t2i1024": (36, 90), "t2i512": (17, 35), "edit512": (27, 57)}
    assert all(0 < rows[f"taylorseer_{name}"]["latent_rel_l2"] < 1 for name in counts)
    cli = rows["decode_cli_b1"]  # the first call and the later ones timed, each with the tokens it made
    assert cli["tokens"] > 0 and cli["first_tok_per_s"] > 0 and cli["steady_tok_per_s"] > 0 and cli["setup_s"] > 0
    assert min(cli["first_tok_per_s"], cli["steady_tok_per_s"]) <= cli["tok_per_s"] <= max(cli["first_tok_per_s"],
                                                                                          cli["steady_tok_per_s"]) * 1.5
