"""The exact prompt-length check of `LocalPipeline`, where a request's tokens are made: a
request past `max_model_len` raises `PromptTooLong` naming the field to change, before any
model work, and fails alone in a batch."""

from __future__ import annotations

import pytest

from bagel_ray.engine.errors import PromptTooLong
from bagel_ray.engine.pipeline import LocalPipeline
from bagel_ray.engine.request import GenerationRequest

LIMIT = 160  # above the think system prompts (86 and 94 tokens with the tiny tokenizer)


@pytest.fixture
def limited(pipeline) -> LocalPipeline:
    return LocalPipeline(pipeline.thinker, pipeline.dit, max_model_len=LIMIT)


def tokens(pipeline, text: str) -> int:
    return len(pipeline.thinker_engine.tokenizer.text_segment(text))


def test_the_limit_names_the_field_to_change(limited, pipeline, monkeypatch):
    forwards = []
    monkeypatch.setattr(pipeline.thinker.model.llm, "forward", lambda *a, **k: forwards.append(1))
    long = "many words " * LIMIT
    assert tokens(pipeline, long) > LIMIT
    cases = [
        (GenerationRequest("text2text", long, max_tokens=1), "prompt"),
        (GenerationRequest("text2text", "hi", max_tokens=LIMIT), "max_tokens"),
        (GenerationRequest("text2img", "hi", think=True, max_think_tokens=LIMIT, height=32, width=32), "max_think_tokens"),
        (GenerationRequest("text2img", long, height=32, width=32), "prompt"),
    ]
    for req, param in cases:
        with pytest.raises(PromptTooLong) as refused:
            limited.run(req)
        assert refused.value.param == param, (req, refused.value)
    assert forwards == []  # refused before any model work


def test_what_fits_runs_and_counts_the_think_system_prompt(limited, pipeline):
    fits = GenerationRequest("text2text", "hi", max_tokens=LIMIT - tokens(pipeline, "hi"))
    assert limited.run(fits).text == pipeline.run(fits).text
    with pytest.raises(PromptTooLong, match="max_tokens"):
        limited.run(GenerationRequest("text2text", "hi", max_tokens=fits.max_tokens, think=True))
    unlimited = GenerationRequest("text2text", "many words " * LIMIT, max_tokens=2)
    assert pipeline.run(unlimited).text is not None  # no max_model_len: no check


def test_a_request_too_long_fails_alone_in_a_batch(limited, pipeline):
    reqs = [GenerationRequest("text2text", "one", max_tokens=4), GenerationRequest("text2text", "many words " * LIMIT, max_tokens=4),
            GenerationRequest("text2text", "three", max_tokens=4)]
    got = limited.understand_batch(reqs)
    assert isinstance(got[1], PromptTooLong) and got[1].param == "prompt"
    assert [got[0].text, got[2].text] == [pipeline.understand(reqs[0]).text, pipeline.understand(reqs[2]).text]
    with pytest.raises(PromptTooLong):
        limited.understanding_contexts(reqs)


def test_each_prompt_is_tokenized_once(limited, pipeline, monkeypatch):
    tok = pipeline.thinker_engine.tokenizer
    seen: list[str] = []
    real = tok.text_segment
    monkeypatch.setattr(tok, "text_segment", lambda text: seen.append(text) or real(text))
    limited.prepare_image(GenerationRequest("text2img", "a fox", height=32, width=32))
    limited.understanding_contexts([GenerationRequest("text2text", "a", max_tokens=2), GenerationRequest("text2text", "b", max_tokens=2)])
    assert seen == ["a fox", "a", "b"]
