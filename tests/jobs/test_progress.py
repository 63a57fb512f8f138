"""Progress lines of a bulk job."""

from __future__ import annotations

import io

import pytest

from bagel_ray.jobs.progress import Progress, duration


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (12.4, "12s"), (283, "4m43s"), (3600 + 125, "1h02m")])
def test_duration(seconds, text):
    assert duration(seconds) == text


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lines_every_interval_and_summary():
    clock, out = Clock(), io.StringIO()
    progress = Progress(total=1000, done=100, failed=1, interval_s=5, out=out, bar=False, clock=clock)
    clock.now += 2
    progress.update(ok=True)
    assert out.getvalue() == ""  # not yet: 2 s < 5 s
    for _ in range(19):
        clock.now += 0.1
        progress.update(ok=True)
    clock.now = 110.0
    progress.update(ok=False)
    assert out.getvalue().splitlines() == ["bulk: 121/1000 done, 2 failed, 2.1 items/s, ETA 6m59s"]
    assert progress.summary() == "bulk: finished: 121/1000 done, 2 failed; this run 21 items (1 failed) in 10s, 2.1 items/s"


def test_no_rate_yet():
    progress = Progress(total=10, done=0, failed=0, out=io.StringIO(), bar=False, clock=Clock())
    assert progress.line() == "bulk: 0/10 done, 0 failed, 0.00 items/s, ETA ?"
