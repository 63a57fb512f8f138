"""The output folder of a bulk job: files then records, repair after a kill, --retry-failed,
one job per folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from bagel_ray.engine.request import GenerationResult
from bagel_ray.flags import UsageError
from bagel_ray.jobs.store import Outcome, ResultStore


def lines(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def text_outcome(item_id: str) -> Outcome:
    return Outcome.of_result(item_id, GenerationResult("text2text", "p", 4, text=f"answer {item_id}", finish_reason="stop",
                                                       timings={"decode_s": 0.5}))


def test_commit_writes_the_file_then_the_record(tmp_path):
    store = ResultStore(tmp_path)
    image = Image.fromarray(np.full((16, 32, 3), 7, dtype=np.uint8))
    store.commit(Outcome.of_result("img", GenerationResult("text2img", "p", 9, image=image, think_text="plan")))
    store.commit(text_outcome("txt"))
    store.commit(Outcome.failed("bad", "no good", "img2img", 3))
    store.close()
    assert lines(tmp_path) == [
        {"id": "img", "status": "ok", "error": None, "output": "img.png", "modality": "text2img", "seed": 9, "timings": {},
         "think_text": "plan"},
        {"id": "txt", "status": "ok", "error": None, "output": "txt.txt", "modality": "text2text", "seed": 4,
         "timings": {"decode_s": 0.5}, "finish_reason": "stop"},
        {"id": "bad", "status": "failed", "error": "no good", "output": None, "modality": "img2img", "seed": 3, "timings": {}},
    ]
    with Image.open(tmp_path / "img.png") as png:
        assert np.array_equal(np.asarray(png), np.asarray(image))
    assert (tmp_path / "txt.txt").read_text() == "answer txt"
    reopened = ResultStore(tmp_path)
    assert reopened.done == {"img": True, "txt": True, "bad": False}
    reopened.close()


def test_outcome_survives_a_row(tmp_path):
    outcome = text_outcome("a")
    again = Outcome.from_row(outcome.to_row())
    assert (again.record, again.data) == (outcome.record, outcome.data)
    empty = Outcome.of_result("e", GenerationResult("text2text", "p", 1, text=""))
    assert Outcome.from_row(empty.to_row()).data == b""  # an empty answer still gets its (empty) file


def test_a_killed_run_is_repaired_on_open(tmp_path):
    store = ResultStore(tmp_path)
    store.commit(text_outcome("a"))
    store.close()
    with open(tmp_path / "results.jsonl", "ab") as f:
        f.write(b'{"id": "b", "status": "o')  # a record cut short
    (tmp_path / ".b.txt.123.tmp").write_text("half")  # an output never renamed into place
    store = ResultStore(tmp_path)
    assert store.truncated_bytes == len(b'{"id": "b", "status": "o')
    assert store.done == {"a": True}
    assert not (tmp_path / ".b.txt.123.tmp").exists()
    store.commit(text_outcome("b"))
    store.close()
    assert [r["id"] for r in lines(tmp_path)] == ["a", "b"]


def test_a_corrupt_complete_line_is_not_dropped_silently(tmp_path):
    (tmp_path / "results.jsonl").write_text('{"id": "a", "status": "ok"}\nnot json\n')
    with pytest.raises(UsageError, match="line 2 is not a bulk record"):
        ResultStore(tmp_path)


def test_retry_failed_drops_failed_records(tmp_path):
    store = ResultStore(tmp_path)
    for outcome in (text_outcome("a"), Outcome.failed("b", "x"), text_outcome("c"), Outcome.failed("d", "y")):
        store.commit(outcome)
    store.close()
    kept = ResultStore(tmp_path)
    assert kept.retried == 0 and kept.done == {"a": True, "b": False, "c": True, "d": False}
    kept.close()
    retry = ResultStore(tmp_path, retry_failed=True)
    assert retry.retried == 2 and retry.done == {"a": True, "c": True}
    retry.close()
    assert [r["id"] for r in lines(tmp_path)] == ["a", "c"]


def test_one_job_per_folder(tmp_path):
    first = ResultStore(tmp_path)
    with pytest.raises(UsageError, match="another bulk job is writing to"):
        ResultStore(tmp_path, lock_wait_s=0.3)
    first.close()
    ResultStore(tmp_path, lock_wait_s=0.3).close()
