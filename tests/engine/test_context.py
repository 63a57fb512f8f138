"""Batched text prefill: `append_text_batch` gives what `append_text` gives one at a time."""

from __future__ import annotations

import torch

from bagel_ray.engine.request import GenerationRequest


def assert_same(batched, single):
    assert (batched.length, batched.rope) == (single.length, single.rope)
    assert batched.kv.shape == single.kv.shape
    assert torch.allclose(batched.kv, single.kv, atol=1e-5, rtol=1e-5)


def test_append_text_batch_matches_one_at_a_time(pipeline):
    """Contexts of different lengths (one empty) and segments of different lengths: padding and
    the mask leave each sample's rows as a forward of its own would make them."""
    builder = pipeline.thinker_engine.builder
    contexts = [
        builder.empty(),
        builder.append_text(builder.empty(), "a short system prompt"),
        builder.append_text(builder.append_text(builder.empty(), "first turn, somewhat longer than the others"), "ok"),
    ]
    assert len({ctx.length for ctx in contexts}) == 3
    texts = ["describe the picture in many more words than the rest of them", "hi", "what next?"]
    batched = builder.append_text_batch(contexts, texts)
    for ctx, text, got in zip(contexts, texts, batched):
        assert_same(got, builder.append_text(ctx, text))


def test_append_text_batch_of_one(pipeline):
    builder = pipeline.thinker_engine.builder
    ctx = builder.append_text(builder.empty(), "context")
    (got,) = builder.append_text_batch([ctx], ["a prompt"])
    want = builder.append_text(ctx, "a prompt")
    assert torch.equal(got.kv, want.kv) and got.rope == want.rope
    assert builder.append_text_batch([], []) == []


def test_understanding_contexts(pipeline, image):
    """Plain prompts are prefilled together; image and think requests are built one by one."""
    reqs = [
        GenerationRequest(modality="text2text", prompt="a plain prompt"),
        GenerationRequest(modality="img2text", prompt="what is this?", image=image),
        GenerationRequest(modality="text2text", prompt="a second, longer plain prompt than the first"),
        GenerationRequest(modality="text2text", prompt="think first", think=True),
    ]
    for got, req in zip(pipeline.understanding_contexts(reqs), reqs):
        assert_same(got, pipeline.understanding_context(req))
