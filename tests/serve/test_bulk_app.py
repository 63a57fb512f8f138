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


def test_bad_images_fail_alone_and_paths_stay_in_the_input_folder(serve_app, tmp_path, capsys):
    """Issue 25: a decompression bomb fails its item (not the job, on every rerun), and an
    item's image outside the input file's folder (absolute, ../, a link leading out) is not
    opened unless --images-anywhere."""
    from PIL import Image

    from tests.jobs.reference import write_jsonl
    from tests.test_cli import bomb_png

    folder, outside = tmp_path / "in", tmp_path / "elsewhere"
    folder.mkdir()
    outside.mkdir()
    Image.new("RGB", (24, 24), (10, 200, 30)).save(outside / "secret.png")
    Image.new("RGB", (24, 24), (200, 10, 30)).save(folder / "good.png")
    (folder / "bomb.png").write_bytes(bomb_png())
    (folder / "link.png").symlink_to(outside / "secret.png")
    ask = {"modality": "img2text", "prompt": "what is it?", "max_tokens": 2}
    inputs = write_jsonl(folder / "in.jsonl", [
        {"id": "good", "image": "good.png", **ask},
        {"id": "bomb", "image": "bomb.png", **ask},
        {"id": "absolute", "image": str(outside / "secret.png"), **ask},
        {"id": "dotdot", "image": "../elsewhere/secret.png", **ask},
        {"id": "link", "image": "link.png", **ask},
        {"id": "text", "modality": "text2text", "prompt": "hi", "max_tokens": 2},
    ])
    out = tmp_path / "out"
    args = ["--app", serve_app.name, "--input", str(inputs), "--output", str(out), "--progress-interval", "1"]
    assert main(args) == 0
    assert "bulk: finished: 6/6 done, 4 failed" in capsys.readouterr().out
    records = {r["id"]: r for r in read_records(out)}
    assert records["good"]["status"] == records["text"]["status"] == "ok"
    assert "cannot read image" in records["bomb"]["error"] and "decompression bomb" in records["bomb"]["error"].lower()
    for item in ("absolute", "dotdot", "link"):
        assert records[item]["status"] == "failed" and "outside the input file's folder" in records[item]["error"], item
    assert main(args) == 0  # a rerun: nothing left, no failure
    assert "0 to run" in capsys.readouterr().out
    assert main([*args, "--retry-failed", "--images-anywhere"]) == 0
    records = {r["id"]: r for r in read_records(out)}
    assert [i for i in records if records[i]["status"] == "failed"] == ["bomb"]
