"""`python -m bagel_ray.jobs.bulk --app NAME`: a bulk job through the session's running tiny
Serve app (its handle's `generate`), in this process. Outputs equal LocalPipeline's for the
same seeds; a rerun skips what is recorded, and --retry-failed runs the failed items again
while keeping one record per item."""

from __future__ import annotations

from bagel_ray.jobs.bulk import main
from bagel_ray.model.tiny import tiny_model_path
from tests.jobs.reference import assert_matches_local, mixed_input, reference_pipeline, read_records


def test_bulk_through_the_app(serve_app, tmp_path, capsys):
    inputs, expected = mixed_input(tmp_path / "in")
    out = tmp_path / "out"
    args = ["--app", serve_app.name, "--input", str(inputs), "--output", str(out), "--progress-interval", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"through Serve app {serve_app.name!r}" in printed
    assert "bulk: finished: 7/7 done, 2 failed" in printed
    with reference_pipeline(tiny_model_path()) as local:
        records = assert_matches_local(out, expected, local)
    assert records[[r["id"] for r in records].index("t2i")]["timings"]["handoff_bytes"] > 0

    first = (out / "results.jsonl").read_bytes()
    assert main(args) == 0  # a rerun: everything has a record
    assert "5 ok and 2 failed in earlier runs, 0 to run" in capsys.readouterr().out
    assert (out / "results.jsonl").read_bytes() == first

    assert main([*args, "--retry-failed"]) == 0  # the broken items run (and fail) again
    assert "2 failed records removed" in capsys.readouterr().out
    records = read_records(out)
    assert sorted(r["id"] for r in records) == sorted(expected)
    assert sorted(r["id"] for r in records if r["status"] == "failed") == ["broken-image", "broken-steps"]


def test_bulk_needs_a_running_app(serve_app, tmp_path, capsys):
    inputs, _ = mixed_input(tmp_path / "in")
    assert main(["--app", "no-such-app", "--input", str(inputs), "--output", str(tmp_path / "out")]) == 2
    assert "Serve app 'no-such-app' does not exist" in capsys.readouterr().err
    assert main(["--app", serve_app.name, "--model", "/other/model", "--input", str(inputs),
                 "--output", str(tmp_path / "out")]) == 2
    assert "differs from the model of Serve app" in capsys.readouterr().err
