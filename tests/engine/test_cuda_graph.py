"""Greedy decoding replayed as CUDA graphs (the decoder's graph per slot count, made by
`cuda_graph.capture`, through `Thinker.decode` and through continuous batching) gives the
eager path's tokens on a GPU; `capture` itself replays what it captured and undoes its warm-up."""

from __future__ import annotations

import pytest
import torch

from bagel_ray.engine.decoder import ContinuousDecoder
from bagel_ray.engine.cuda_graph import capture
from bagel_ray.engine.decoder import DecodeParams

PROMPTS = ["Tell me a fun fact about the moon.", "hi", "What is a fox?"]


def test_capture_replays_the_work_and_undoes_the_warm_up():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    device = torch.device("cuda")
    x = torch.arange(4.0, device=device)
    counter = torch.zeros(1, device=device)

    def step() -> torch.Tensor:
        counter.add_(1)
        return x * counter

    undone = []
    graph, out = capture(step, device, after_warm_up=lambda: (counter.zero_(), undone.append(True)))
    assert undone == [True]
    counter.zero_()  # the capture ran the step once more (recorded, not run) and left counter as it was
    for n in (1, 2, 3):
        graph.replay()
        torch.testing.assert_close(out, x * n)


@pytest.fixture
def thinker(gpu_pipeline):
    th = gpu_pipeline.thinker_engine
    yield th
    th.cuda_graphs = True


def _decode(th, contexts, graphs: bool, n: int = 16):
    th.cuda_graphs = graphs
    return th.decode(contexts, DecodeParams(max_new_tokens=n), keep_logits=True)


def test_graphed_decoding_gives_the_eager_tokens(thinker):
    contexts = [thinker.append_text(thinker.empty(), p) for p in PROMPTS]
    for ctx in contexts:
        eager = _decode(thinker, [ctx], graphs=False)[0]
        graphed = _decode(thinker, [ctx], graphs=True)[0]
        assert graphed.token_ids == eager.token_ids
        torch.testing.assert_close(graphed.logits, eager.logits, rtol=0, atol=0)
    batch_eager = _decode(thinker, contexts, graphs=False)
    batch_graphed = _decode(thinker, contexts, graphs=True)
    assert [o.token_ids for o in batch_graphed] == [o.token_ids for o in batch_eager]


def _continuous(th, contexts, budgets, graphs: bool) -> dict:
    """Sequence 0 runs a chunk alone (the one-slot step), then 1 and 2 join (the four-slot step)."""
    th.cuda_graphs = graphs
    decoder = ContinuousDecoder(th, slots=4, width=96, chunk=4)
    decoder.admit(0, contexts[0], budgets[0])
    finished = {seq.key: seq.token_ids for seq in decoder.run()}
    for i in (1, 2):
        decoder.admit(i, contexts[i], budgets[i])
    while any(s is not None for s in decoder.active):
        finished.update((seq.key, seq.token_ids) for seq in decoder.run())
    return finished


def test_the_continuous_decoders_graphs_give_its_eager_tokens(thinker):
    budgets = [12, 5, 20]
    contexts = [thinker.append_text(thinker.empty(), p) for p in PROMPTS]
    eager = _continuous(thinker, contexts, budgets, graphs=False)
    graphed = _continuous(thinker, contexts, budgets, graphs=True)
    assert sorted(graphed) == [0, 1, 2]
    assert graphed == eager
