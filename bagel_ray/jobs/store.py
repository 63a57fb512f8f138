"""The output folder of a bulk job: one file per item and `results.jsonl`, safe to kill at
any moment and to resume.

- An item's output (`<id>.png` or `<id>.txt`) is written to a hidden temp file, fsynced and
  renamed into place, so it is whole or absent.
- Then its record is appended to `results.jsonl` as one full line (one `write`, then
  fsync). The record is what makes an item done: a kill between the two leaves a file
  without a record, and the rerun writes the same file again (same seed, same bytes).
- On open, the records are read back: a last line cut short by a kill is dropped (truncated
  away), leftover temp files are removed, and the ids with a record are skipped by the run.
  With `retry_failed`, failed records are removed first (the file is rewritten atomically),
  so those items run again and every id keeps exactly one record.
- One job at a time per folder: an exclusive lock (`.bulk.lock`) is held while it runs.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bagel_ray.atomic import png_bytes, temp_path, write_bytes
from bagel_ray.engine.request import GenerationResult
from bagel_ray.flags import UsageError

RESULTS_FILE = "results.jsonl"
LOCK_FILE = ".bulk.lock"


@dataclass
class Outcome:
    """What one item produced: its record for results.jsonl and, when ok, the bytes of its
    output file (named by `record["output"]`, relative to the folder)."""

    record: dict[str, Any]
    data: bytes | None = None

    @property
    def id(self) -> str:
        return self.record["id"]

    @property
    def ok(self) -> bool:
        return self.record["status"] == "ok"

    @classmethod
    def failed(cls, item_id: str, error: str, modality: Any = None, seed: Any = None) -> "Outcome":
        return cls({"id": item_id, "status": "failed", "error": error, "output": None, "modality": modality,
                    "seed": seed, "timings": {}})

    @classmethod
    def of_result(cls, item_id: str, result: GenerationResult) -> "Outcome":
        if result.image is not None:
            output, data = f"{item_id}.png", png_bytes(result.image)
        else:
            output, data = f"{item_id}.txt", result.text.encode("utf-8")
        record = {"id": item_id, "status": "ok", "error": None, "output": output, "modality": result.modality,
                  "seed": result.seed, "timings": dict(result.timings)}
        if result.think_text is not None:
            record["think_text"] = result.think_text
        if result.finish_reason is not None:
            record["finish_reason"] = result.finish_reason
        return cls(record, data)

    # As a row of a Ray Data block: plain columns only.
    def to_row(self) -> dict[str, Any]:
        return {"id": self.id, "record": json.dumps(self.record, ensure_ascii=False), "data": self.data or b""}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Outcome":
        record = json.loads(row["record"])
        return cls(record, bytes(row["data"]) if record["output"] is not None else None)


def _lock(path: Path, wait_s: float) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise UsageError(f"another bulk job is writing to {path.parent} (it holds {path.name}); "
                                 "wait for it to end or stop it") from None
            time.sleep(0.2)


class ResultStore:
    def __init__(self, folder: Path, retry_failed: bool = False, lock_wait_s: float = 10.0) -> None:
        self.folder = folder
        self.results = folder / RESULTS_FILE
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._lock_fd = _lock(folder / LOCK_FILE, lock_wait_s)
        except OSError as exc:
            raise UsageError(f"cannot use output folder {folder}: {exc}") from exc
        self._fd = -1
        try:
            self._remove_temp_files()
            self.truncated_bytes = self._repair()
            self.retried = self._drop_failed() if retry_failed else 0
            self.done = self._read_done()  # id -> whether its record is ok
            self._fd = os.open(self.results, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except BaseException:
            self.close()
            raise

    def _remove_temp_files(self) -> None:
        """Temp files of outputs a killed run was writing (never renamed into place)."""
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file():
                    os.unlink(entry.path)

    def _records(self):
        """(line number, raw line, record) of each complete line."""
        with open(self.results, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.endswith(b"\n"):
                    return
                try:
                    record = json.loads(raw)
                except ValueError:
                    record = None
                if not isinstance(record, dict) or "id" not in record or "status" not in record:
                    raise UsageError(f"{self.results} line {n} is not a bulk record; fix or remove that line")
                yield n, raw, record

    def _repair(self) -> int:
        """Cut a last line that a kill left without its newline; returns the bytes cut."""
        if not self.results.exists():
            return 0
        complete = sum(len(raw) for _, raw, _ in self._records())
        cut = self.results.stat().st_size - complete
        if cut:
            os.truncate(self.results, complete)
        return cut

    def _drop_failed(self) -> int:
        """Rewrite results.jsonl without its failed records; returns how many were dropped."""
        if not self.results.exists():
            return 0
        tmp, dropped = temp_path(self.results), 0
        try:
            with open(tmp, "wb") as out:
                for _, raw, record in self._records():
                    if record["status"] == "ok":
                        out.write(raw)
                    else:
                        dropped += 1
                out.flush()
                os.fsync(out.fileno())
            if dropped:
                os.replace(tmp, self.results)
        finally:
            tmp.unlink(missing_ok=True)
        return dropped

    def _read_done(self) -> dict[str, bool]:
        if not self.results.exists():
            return {}
        return {record["id"]: record["status"] == "ok" for _, _, record in self._records()}

    def commit(self, outcome: Outcome) -> None:
        """The output file (atomically), then the record (one line, fsynced)."""
        if outcome.data is not None:
            write_bytes(self.folder / outcome.record["output"], outcome.data)
        line = memoryview((json.dumps(outcome.record, ensure_ascii=False) + "\n").encode("utf-8"))
        while line:
            line = line[os.write(self._fd, line):]
        os.fsync(self._fd)
        self.done[outcome.id] = outcome.ok

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = -1
