"""`python -m bagel_ray.jobs.bulk` checks its flags and input before anything loads (one
`error:` line, exit 2), and a rerun with nothing left to do ends at once."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bagel_ray.jobs import data_runner
from bagel_ray.jobs.bulk import build_parser, main, make_runner
from bagel_ray.model.loader import DEFAULT_MODEL
from tests.conftest import REPO_ROOT
from tests.jobs.reference import write_jsonl


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red fox\na blue boat\n")
    return path


@pytest.mark.parametrize("extra, message", [
    (["--max-in-flight", "4"], "--max-in-flight only applies with --app"),
    (["--app", "bagel", "--thinker-replicas", "2", "--device", "cpu"], "--device, --thinker-replicas only apply without --app"),
    (["--image-path", "x.png"], "--image-path does not apply to text2img"),
    (["--modality", "img2img"], "img2img needs an input image"),
    (["--modality", "img2img", "--image-path", "missing.png"], "cannot read image"),
    (["--progress-interval", "0"], "--progress-interval must be > 0"),
    (["--app", "bagel", "--dit-batch-size", "4"], "--dit-batch-size only applies without --app"),
])
def test_bad_flags(prompts, tmp_path, capsys, extra, message):
    assert main(["--model", "tiny", "--input", str(prompts), "--output", str(tmp_path / "out"), *extra]) == 2
    assert message in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("extra, message", [
    (["--steps", "0"], "argument --num-inference-steps/--steps: num_inference_steps must be >= 1 and <= 500, got 0"),
    (["--height", "20"], "argument --height: height must be >= 16 and a multiple of 16, got 20"),
    (["--seed", str(2**70)], "argument --seed: seed must be >= 0 and <= 9223372036854775807"),
    (["--seed", "-1"], "argument --seed: seed must be >= 0"),
    (["--max-tokens", str(10**12)], "argument --max-tokens: max_tokens must be >= 1 and <= 32768"),
    (["--num-inference-steps", "2.0"], "num_inference_steps must be an integer, got '2.0'"),
])
def test_knob_flags_out_of_range(prompts, tmp_path, capsys, extra, message):
    """The HTTP API's ranges, refused by argparse: one error line, exit status 2."""
    with pytest.raises(SystemExit) as exc:
        main(["--model", "tiny", "--input", str(prompts), "--output", str(tmp_path / "out"), *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("python -m bagel_ray.jobs.bulk: error: ") and message in err, err
    assert "Traceback" not in err


def test_batch_size_flags_reach_the_data_options(prompts, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data_runner, "DataRunner", lambda options, address: options)  # no Ray
    base = ["--input", str(prompts), "--output", str(tmp_path / "out")]
    options = make_runner(build_parser().parse_args([*base, "--dit-batch-size", "4", "--thinker-batch-size", "2"]))
    assert (options.dit_batch_size, options.thinker_batch_size) == (4, 2)
    assert make_runner(build_parser().parse_args(base)) == data_runner.DataOptions(model=DEFAULT_MODEL, dit_batch_size=8)
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--dit-batch-size", "0"])
    assert "--dit-batch-size: must be >= 1, got 0" in capsys.readouterr().err


def test_bad_input(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["--input", str(tmp_path / "missing.jsonl"), "--output", out]) == 2
    assert "is not a file" in one_error_line(capsys.readouterr().err)
    (tmp_path / "in.csv").write_text("a,b\n")
    assert main(["--input", str(tmp_path / "in.csv"), "--output", out]) == 2
    assert "must be a .txt" in one_error_line(capsys.readouterr().err)
    bad = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "p"}, {"id": "a", "prompt": "q"}])
    assert main(["--input", str(bad), "--output", out]) == 2
    assert "line 2: duplicate id 'a'" in one_error_line(capsys.readouterr().err)


def test_nothing_left_to_do_needs_no_cluster(tmp_path, capsys):
    inputs = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "p"}, {"id": "b", "prompt": "q"}])
    out = tmp_path / "out"
    out.mkdir()
    records = [{"id": "a", "status": "ok", "error": None, "output": "a.png"}, {"id": "b", "status": "failed", "error": "x"}]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["--model", "/nonexistent", "--input", str(inputs), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 items in" in printed and "1 ok and 1 failed in earlier runs, 0 to run" in printed
    assert "bulk: finished: 2/2 done, 1 failed; this run 0 items" in printed


def test_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "bagel_ray.jobs.bulk", "--help"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "--thinker-replicas" in done.stdout and "--app NAME" in done.stdout


def test_a_missing_optional_dependency_is_one_line(prompts, tmp_path, capsys, monkeypatch):
    """Without the [jobs] extra the job says what to install, not "rerun to resume"."""
    from bagel_ray.jobs import bulk

    def no_ray_data(args):
        raise ModuleNotFoundError("No module named 'pyarrow'", name="pyarrow")

    monkeypatch.setattr(bulk, "make_runner", no_ray_data)
    assert main(["--input", str(prompts), "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err == "bulk: pyarrow is not installed: pip install 'bagel-ray[jobs]'\n", err
