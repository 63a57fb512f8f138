"""The bookkeeping of `benchmarks/soak.py` (the soak itself starts a cluster and runs for
minutes: `python -m benchmarks.soak`, not part of the suite)."""

from __future__ import annotations

from benchmarks.soak import Ledger, growth


def test_ledger_catches_lost_duplicated_mixed_up_and_failed_answers():
    ledger = Ledger()
    ids = [ledger.open() for _ in range(6)]
    ledger.answer(ids[0], ("text", 0), "aaa")
    ledger.answer(ids[1], ("text", 0), "aaa")  # the same variant, the same answer: fine
    ledger.answer(ids[2], ("text", 0), "bbb")  # another answer to the same variant: mixed up
    ledger.answer(ids[3], ("image", 1), "ccc")
    ledger.answer(ids[3], ("image", 1), "ccc")  # answered twice
    ledger.fail(ids[4], "text: HTTPError")
    # ids[5] never answered
    assert ledger.problems() == {"lost": 1, "duplicated": 1, "mixed_up": 1, "failed": 1}
    assert ledger.mixed_up == [ids[2]]


def test_growth_is_the_end_over_the_warm_baseline():
    assert growth([500.0, 510.0, 505.0, 520.0, 530.0], warmup=3) == 530.0 - 505.0
    assert growth([80, 80, 79, 80], warmup=1) == 0
    assert growth([100.0, 90.0], warmup=1) == -10.0
