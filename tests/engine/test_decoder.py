"""Continuous batching gives each sequence the tokens it gets decoded alone, whatever joins or
leaves the batch around it."""

from __future__ import annotations

import pytest

from bagel_ray.engine.decoder import ContinuousDecoder
from bagel_ray.engine.pipeline import LocalPipeline
from bagel_ray.engine.decoder import DecodeParams
from bagel_ray.model.tiny import make_tiny_model

PROMPTS = ["Tell me a fun fact about the moon.", "hi", "What is a fox?", "Write a long poem about the sea and the sky.", "ok"]


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    return LocalPipeline.from_pretrained(make_tiny_model(tmp_path_factory.mktemp("tiny")), dtype="float32").thinker


def test_staggered_admission_matches_decoding_alone(thinker):
    budgets = [12, 5, 20, 9, 3]
    contexts = [thinker.append_text(thinker.empty(), p) for p in PROMPTS]
    alone = [thinker.decode([c], DecodeParams(max_new_tokens=n))[0] for c, n in zip(contexts, budgets)]
    decoder = ContinuousDecoder(thinker, slots=2, width=64, chunk=4)
    pending = list(range(len(PROMPTS)))
    finished = {}
    rounds = 0
    while pending or any(s is not None for s in decoder.active):
        while pending and decoder.free_slots:
            i = pending.pop(0)
            decoder.admit(i, contexts[i], budgets[i])
        for seq in decoder.run():
            finished[seq.key] = seq
        rounds += 1
        assert rounds < 100
    assert sorted(finished) == list(range(len(PROMPTS)))
    for i, out in enumerate(alone):
        assert finished[i].token_ids == out.token_ids, PROMPTS[i]
        assert finished[i].stopped_on_eos == out.stopped_on_eos


def test_cancel_frees_the_slot(thinker):
    ctx = thinker.append_text(thinker.empty(), "hello")
    decoder = ContinuousDecoder(thinker, slots=1, width=32, chunk=2)
    decoder.admit("a", ctx, 10)
    assert decoder.free_slots == 0
    decoder.cancel("a")
    assert decoder.free_slots == 1
    decoder.admit("b", ctx, 4)
    done = []
    while not done:
        done = decoder.run()
    assert done[0].key == "b" and done[0].token_ids == thinker.decode([ctx], DecodeParams(max_new_tokens=4))[0].token_ids


def test_admit_checks_the_width(thinker):
    ctx = thinker.append_text(thinker.empty(), "hello there")
    decoder = ContinuousDecoder(thinker, slots=1, width=ctx.length + 4 + 8, chunk=8)
    assert not decoder.fits(ctx, 5) and decoder.fits(ctx, 4)
    with pytest.raises(ValueError):
        decoder.admit("x", ctx, 5)


def test_a_sequence_that_ends_mid_chunk_stays_inside_its_slot(thinker):
    """A chunk runs as many steps as its longest sequence needs; one that ends earlier keeps
    writing a row a step until the chunk ends, so a full slot must leave room for that (the
    cache row past the width was an IndexError here, a device assert on a GPU)."""
    long, short = (thinker.append_text(thinker.empty(), p) for p in (PROMPTS[3], PROMPTS[1]))
    decoder = ContinuousDecoder(thinker, slots=2, width=long.length + 20, chunk=8)
    # each as many tokens as `fits` allows: the long prompt's budget ends mid-chunk, the short one's later
    budgets = {key: max(n for n in range(1, 64) if decoder.fits(ctx, n)) for key, ctx in (("long", long), ("short", short))}
    assert budgets["long"] % 8 and budgets["short"] > budgets["long"]
    decoder.admit("long", long, budgets["long"])
    decoder.admit("short", short, budgets["short"])
    finished = {}
    while any(s is not None for s in decoder.active):
        finished.update((seq.key, seq) for seq in decoder.run())
    for key, ctx in (("long", long), ("short", short)):
        alone = thinker.decode([ctx], DecodeParams(max_new_tokens=budgets[key]))[0]
        assert finished[key].token_ids == alone.token_ids


def test_steps_run_only_the_leading_live_slots(thinker, monkeypatch):
    """A lone sequence in an 8-slot decoder runs a step of one slot; later arrivals widen the
    step to the next prepared size (powers of four, and all slots); each sequence still gets
    its tokens decoded alone."""
    contexts = [thinker.append_text(thinker.empty(), p) for p in PROMPTS]
    budgets = [10, 6, 8, 7, 5]
    alone = [thinker.decode([c], DecodeParams(max_new_tokens=n))[0].token_ids for c, n in zip(contexts, budgets)]
    decoder = ContinuousDecoder(thinker, slots=8, width=64, chunk=2)
    assert sorted(decoder._steps) == [1, 4, 8]
    ran: list[int] = []
    for rows, step in list(decoder._steps.items()):
        def counted(step=step, rows=rows):
            ran.append(rows)
            return step()
        monkeypatch.setitem(decoder._steps, rows, counted)
    decoder.admit(0, contexts[0], budgets[0])
    finished = {seq.key: seq for seq in decoder.run()}
    assert set(ran) == {1}
    for i in (1, 2):  # slots 0-2 live: steps of 4 slots
        decoder.admit(i, contexts[i], budgets[i])
    finished.update((seq.key, seq) for seq in decoder.run())
    assert ran[-1] == 4
    for i in (3, 4):  # slots 3 and 4: all 8
        decoder.admit(i, contexts[i], budgets[i])
    while any(seq is not None for seq in decoder.active):
        finished.update((seq.key, seq) for seq in decoder.run())
    assert 8 in ran
    assert [finished[i].token_ids for i in range(5)] == alone
