"""Prompt prefills replayed as CUDA graphs: the padded prefill they capture gives the prompt's
own K/V (CPU, exact math), and on a GPU the replays match the eager prefill."""

from __future__ import annotations

import pytest
import torch

from bagel_ray.engine.prefill_graphs import padded_length, prefill_padded

PROMPT = "A photo of a red fox sleeping under an old oak tree"


def test_padded_length():
    assert [padded_length(n, 64) for n in (1, 63, 64, 65, 128)] == [64, 64, 64, 128, 128]


@torch.inference_mode()
def test_padding_at_the_end_leaves_the_prompt_rows_as_they_were(pipeline):
    """What a graph computes (the prompt padded to a bucket, under a causal mask) has, in the
    prompt's rows, the K/V of the eager prefill of the prompt alone."""
    builder = pipeline.thinker_engine.builder
    ids = builder.tokenizer.text_segment(PROMPT)
    n = len(ids)
    length = padded_length(n, 16) + 16  # a whole padded bucket more than needed
    padded = torch.tensor(ids + [0] * (length - n))
    got = prefill_padded(builder.model, padded)
    want = builder.append_text(builder.empty(), PROMPT)
    assert want.length == n and want.rope == n
    kv = torch.stack([torch.stack((k[0, :n], v[0, :n])) for k, v in got])
    torch.testing.assert_close(kv, want.kv, rtol=1e-5, atol=1e-5)


@pytest.fixture
def gpu_thinker(gpu_pipeline):
    return gpu_pipeline.thinker_engine


def test_a_prompt_prefill_on_a_gpu_replays_one_graph_per_length(gpu_thinker):
    th = gpu_thinker
    prompts = [PROMPT, "a cat", "a much longer prompt " * 40]
    th.cuda_graphs = False
    eager = [th.append_text(th.empty(), p) for p in prompts]
    th.cuda_graphs = True
    try:
        graphed = [th.append_text(th.empty(), p) for p in prompts]
        again = th.append_text(th.empty(), PROMPT)  # a replay after other lengths ran
    finally:
        th.cuda_graphs = True
    graphs = th.builder._prefill_graphs
    assert sorted(graphs._graphs) == sorted({padded_length(c.length, graphs.bucket) for c in eager})
    for got, want in zip(graphed + [again], eager + [eager[0]]):
        assert (got.length, got.rope) == (want.length, want.rope)
        torch.testing.assert_close(got.kv.float(), want.kv.float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(again.kv, graphed[0].kv)


def test_a_prompt_past_the_longest_graph_prefills_eagerly(gpu_thinker):
    th = gpu_thinker
    th.append_text(th.empty(), "warm")
    graphs = th.builder._prefill_graphs
    before = dict(graphs._graphs)
    graphs.max_tokens, saved = 4, graphs.max_tokens
    try:
        got = th.append_text(th.empty(), PROMPT)
    finally:
        graphs.max_tokens = saved
    assert graphs._graphs == before
    th.cuda_graphs = False
    try:
        want = th.append_text(th.empty(), PROMPT)
    finally:
        th.cuda_graphs = True
    assert torch.equal(got.kv, want.kv)
