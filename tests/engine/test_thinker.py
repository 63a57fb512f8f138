"""The Thinker decodes on one decoder set up with the engine: calls reuse it, a bigger batch
gives it more slots, a call that needs longer slots or comes while it is busy gets its own, and
none of this changes a token."""

from __future__ import annotations

import torch

from bagel_ray.engine.decoder import DecodeParams
from bagel_ray.engine.thinker import Thinker

PROMPTS = ["Tell me a fun fact about the moon.", "hi", "What is a fox?", "Write a long poem about the sea and the sky."]
GREEDY = DecodeParams(max_new_tokens=12)
SAMPLED = DecodeParams(max_new_tokens=12, do_sample=True, temperature=1.0, top_p=0.9)


def _fresh(pipeline, decode_width: int = 2048) -> Thinker:
    th = pipeline.thinker
    return Thinker(th.model, th.tokenizer, decode_width=decode_width)


def _tokens(th: Thinker, contexts, params: DecodeParams, seed: int = 5) -> list[list[int]]:
    return [o.token_ids for o in th.decode(contexts, params, torch.Generator().manual_seed(seed))]


def test_calls_reuse_the_decoder_set_up_with_the_engine(pipeline):
    th = _fresh(pipeline)
    decoder = th.decoder_for(1, 1)
    assert (decoder.slots, decoder.width) == (1, 2048)
    ctx = th.append_text(th.empty(), PROMPTS[0])
    first = _tokens(th, [ctx], GREEDY)
    assert _tokens(th, [ctx], GREEDY) == first
    assert _tokens(th, [ctx], SAMPLED) == _tokens(th, [ctx], SAMPLED)
    assert th.decoder_for(1, 1) is decoder and not decoder.busy


def test_a_bigger_batch_adds_slots_and_a_longer_decode_gets_its_own_decoder(pipeline):
    th = _fresh(pipeline, decode_width=64)
    contexts = [th.append_text(th.empty(), p) for p in PROMPTS]
    assert max(c.length for c in contexts) + GREEDY.max_new_tokens <= 64
    batch = {params: _tokens(th, contexts, params) for params in (GREEDY, SAMPLED)}
    decoder = th.decoder_for(1, 1)
    assert (decoder.slots, decoder.width) == (4, 64)  # kept for the calls after
    long = DecodeParams(max_new_tokens=80)
    alone = _tokens(th, contexts[:1], long)
    assert th.decoder_for(1, 1) is decoder and th.decoder_for(1, 65) is not decoder
    roomy = _fresh(pipeline, decode_width=4096)  # every call on the engine's decoder
    assert _tokens(roomy, contexts[:1], long) == alone
    for params in (GREEDY, SAMPLED):
        assert _tokens(roomy, contexts, params) == batch[params]
        for i, ctx in enumerate(contexts):  # one slot of four against one slot of one
            assert _tokens(th, [ctx], params, seed=i) == _tokens(roomy, [ctx], params, seed=i)


def test_a_decode_while_another_is_being_consumed_gets_its_own_decoder(pipeline):
    th = _fresh(pipeline)
    a, b = (th.append_text(th.empty(), p) for p in PROMPTS[:2])
    alone = {key: _tokens(th, [ctx], GREEDY)[0] for key, ctx in (("a", a), ("b", b))}
    own = th.decoder_for(1, 1)
    stream = th.decode_steps([a], GREEDY)
    streamed = [next(stream).tokens[0] for _ in range(3)]
    assert own.busy and th.decoder_for(1, 1) is not own
    assert _tokens(th, [b], GREEDY)[0] == alone["b"]
    streamed += [step.tokens[0] for step in stream]
    assert [t for t in streamed if t is not None] == alone["a"]
    assert not own.busy and th.decoder_for(1, 1) is own


def test_a_text_stream_closed_early_frees_the_decoder(pipeline):
    from bagel_ray.engine.pipeline import LocalPipeline
    from bagel_ray.engine.request import GenerationRequest

    pipe = LocalPipeline(_fresh(pipeline), None)
    own = pipe.thinker.decoder_for(1, 1)
    stream = pipe.understand_stream(GenerationRequest("text2text", PROMPTS[0], max_tokens=12))
    assert isinstance(next(stream), str) and own.busy
    stream.close()
    assert not own.busy and pipe.thinker.decoder_for(1, 1) is own
