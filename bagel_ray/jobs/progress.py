"""Progress of a bulk job that a person can follow in `ray job logs -f`: a line every few
seconds on stdout (flushed), or a tqdm bar when stdout is a terminal, and a final summary.

    bulk: 120/1000 done, 2 failed, 3.1 items/s, ETA 4m43s

`done` and `failed` count every item with a record, earlier runs included; the rate and the
ETA are this run's.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def duration(seconds: float) -> str:
    """4m43s, 1h02m, 12s."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def per_second(rate: float) -> str:
    return f"{rate:.0f}" if rate >= 100 else f"{rate:.1f}" if rate >= 1 else f"{rate:.2f}"


class Progress:
    def __init__(self, total: int, done: int, failed: int, interval_s: float = 10.0,
                 out: TextIO | None = None, bar: bool | None = None, clock=time.monotonic) -> None:
        self.total, self.done, self.failed = total, done, failed
        self.ran = self.ran_failed = 0  # this run
        self.interval_s = interval_s
        self.out = out or sys.stdout
        self.clock = clock
        self.start = self.last = clock()
        self.bar = None
        if bar if bar is not None else self.out.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="item", file=self.out, dynamic_ncols=True)
            self.bar.set_postfix(failed=failed)

    def say(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=self.out)
        else:
            print(message, file=self.out, flush=True)

    def rate(self) -> float:
        elapsed = self.clock() - self.start
        return self.ran / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate()
        eta = duration((self.total - self.done) / rate) if rate > 0 else "?"
        return f"bulk: {self.done}/{self.total} done, {self.failed} failed, {per_second(rate)} items/s, ETA {eta}"

    def update(self, ok: bool) -> None:
        self.done += 1
        self.ran += 1
        if not ok:
            self.failed += 1
            self.ran_failed += 1
        if self.bar is not None:
            self.bar.update(1)
            if not ok:
                self.bar.set_postfix(failed=self.failed)
            return
        now = self.clock()
        if now - self.last >= self.interval_s:
            self.last = now
            self.say(self.line())

    def summary(self) -> str:
        elapsed = self.clock() - self.start
        return (f"bulk: finished: {self.done}/{self.total} done, {self.failed} failed; this run {self.ran} items "
                f"({self.ran_failed} failed) in {duration(elapsed)}, {per_second(self.rate())} items/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
