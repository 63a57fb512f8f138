"""The DiT forward with its layers' non-attention work replayed as CUDA graphs (`DitGraphs`):
eager on the CPU; on a GPU the same latents as the eager forward, for contexts of any length,
with graphs captured once per shape."""

from __future__ import annotations

import torch

from bagel_ray.engine.dit_graphs import DitGraphs
from bagel_ray.engine.request import GenerationRequest
from bagel_ray.model.llm import ExpertRows, ForwardMode, RaggedKV

PROMPTS = ("a red fox under an oak tree", "a cat")  # contexts of two lengths


@torch.inference_mode()
def test_on_the_cpu_the_forward_is_the_eager_one(pipeline):
    model = pipeline.dit.model
    graphs = DitGraphs(model.llm)
    ctx = pipeline.thinker_engine.append_text(pipeline.thinker_engine.empty(), PROMPTS[0])
    n = 6
    embeds = torch.randn(2, n, model.cfg.llm.hidden_size)
    positions = torch.full((2, n), ctx.rope)
    rows = ExpertRows.block_markers(2, n, "cpu")
    past = [[ctx.layer(i) for i in range(ctx.kv.shape[0])], None]
    stream, got = graphs(embeds, positions, rows, RaggedKV(past), ForwardMode(gen=True))
    want, _, want_stream = model.llm(embeds, positions, rows, RaggedKV(past), ForwardMode(gen=True), with_stream=True)
    assert torch.equal(got, want) and torch.equal(stream, want_stream)
    assert torch.equal(want, model.llm(embeds, positions, rows, RaggedKV(past), ForwardMode(gen=True))[0])
    assert graphs._captured == {}


def _latents(pipe, prompt: str, graphs: bool, steps: int = 6, taylorseer: bool = False) -> torch.Tensor:
    """text2img with cfg_text on part of the schedule: 2-branch steps, then 1-branch ones."""
    req = GenerationRequest("text2img", prompt, seed=3, num_inference_steps=steps, height=64, width=64,
                            cfg_interval=(0.5, 1.0), taylorseer=taylorseer)
    prepared = pipe.prepare_image(req)
    pipe.dit.cuda_graphs = graphs
    try:
        return pipe.dit.denoise(prepared.contexts, req.sampler(), prepared.noise)
    finally:
        pipe.dit.cuda_graphs = True


def test_denoising_with_graphs_gives_the_eager_latents(gpu_pipeline):
    pipe = gpu_pipeline
    eager = [_latents(pipe, p, graphs=False) for p in PROMPTS]
    graphed = [_latents(pipe, p, graphs=True) for p in PROMPTS]
    again = _latents(pipe, PROMPTS[0], graphs=True)
    captured = pipe.dit._graphs._captured
    h, w = pipe.dit.latent_grid(64, 64)
    assert {(b, n) for b, n, *_ in captured} == {(1, h * w + 2), (2, h * w + 2)}  # a block: markers + latents
    assert all(c is not None for c in captured.values())
    for got, want in zip(graphed + [again], eager + [eager[0]]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_taylorseer_with_graphs_gives_the_eager_latents(gpu_pipeline):
    """The step cache keeps the graphs of its full forwards: the last layer's output it stores
    is the graphs' own stream, copied before the next replay."""
    pipe = gpu_pipeline
    eager = _latents(pipe, PROMPTS[0], graphs=False, steps=16, taylorseer=True)
    graphed = [_latents(pipe, PROMPTS[0], graphs=True, steps=16, taylorseer=True) for _ in range(2)]
    assert all(torch.equal(g, eager) for g in graphed)
    assert not torch.equal(eager, _latents(pipe, PROMPTS[0], graphs=False, steps=16))


def test_a_shape_past_max_rows_runs_eagerly(gpu_pipeline):
    pipe = gpu_pipeline
    graphs = pipe.dit._graphs
    saved, graphs.max_rows = graphs.max_rows, 1
    before = dict(graphs._captured)
    try:
        got = _latents(pipe, PROMPTS[1], graphs=True)
    finally:
        graphs.max_rows = saved
    assert graphs._captured == before
    assert torch.equal(got, _latents(pipe, PROMPTS[1], graphs=False))


def test_a_failed_capture_leaves_its_shape_eager(gpu_pipeline, monkeypatch):
    from bagel_ray.engine.dit import DiT

    pipe = gpu_pipeline
    dit = DiT(pipe.dit.model, pipe.dit.tokenizer, pipe.dit.vae)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (_ for _ in ()).throw(RuntimeError("no memory")))
    want = _latents(pipe, PROMPTS[0], graphs=False)
    pipe_dit, pipe.dit = pipe.dit, dit
    try:
        first = _latents(pipe, PROMPTS[0], graphs=True)
        second = _latents(pipe, PROMPTS[0], graphs=True)
    finally:
        pipe.dit = pipe_dit
    assert dit._graphs._captured and all(c is None for c in dit._graphs._captured.values())
    assert torch.equal(first, want) and torch.equal(second, want)


def test_shapes_are_captured_while_their_rows_fit_the_budget(pipeline):
    graphs = DitGraphs(pipeline.dit.model.llm, max_rows=100, max_total_rows=250)
    assert graphs.has_room(100) and not graphs.has_room(101)
    graphs._captured[(1, 100, torch.bfloat16, "cuda")] = object()  # a captured shape holds its rows
    graphs._captured[(3, 50, torch.bfloat16, "cuda")] = None  # one left eager holds nothing
    assert graphs.has_room(100) and graphs.has_room(150 - 50)
    graphs._captured[(2, 50, torch.bfloat16, "cuda")] = object()
    assert graphs.has_room(50) and not graphs.has_room(51)


def test_a_shape_past_the_budget_stays_eager(gpu_pipeline):
    from bagel_ray.engine.dit import DiT

    pipe = gpu_pipeline
    dit = DiT(pipe.dit.model, pipe.dit.tokenizer, pipe.dit.vae)
    h, w = dit.latent_grid(64, 64)
    dit._graphs.max_total_rows = h * w + 2  # room for the 1-block shape only
    want = _latents(pipe, PROMPTS[0], graphs=False)
    pipe_dit, pipe.dit = pipe.dit, dit
    try:
        got = [_latents(pipe, PROMPTS[0], graphs=True) for _ in range(2)]
    finally:
        pipe.dit = pipe_dit
    captured = dit._graphs._captured
    assert {(b, c is not None) for (b, *_), c in captured.items()} == {(1, True), (2, False)}
    assert all(torch.equal(g, want) for g in got)


# -- the parallel path: graphs between the split attentions ----------------------------------


def _parallel_rank(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    """A rank on the one GPU (gloo between the ranks): each grid's latents eager, then twice
    with graphs (captured, then replayed), and the shapes this rank captured."""
    import datetime

    import torch.distributed as dist

    from bagel_ray.engine.dit_parallel import ParallelConfig, ParallelDiT
    from bagel_ray.engine.pipeline import LocalPipeline

    torch.cuda.set_device(0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    pipe = LocalPipeline.from_pretrained(model_dir, device="cuda", dtype="bfloat16")
    results = {}
    for cfg, seq in [(2, 1), (1, 2)]:
        engine = ParallelDiT(pipe.dit, ParallelConfig(cfg, seq))
        for graphs in (False, True, True):
            engine.cuda_graphs = graphs
            req = GenerationRequest("text2img", PROMPTS[0], seed=3, num_inference_steps=6, height=64, width=64,
                                    cfg_interval=(0.5, 1.0))
            prepared = pipe.prepare_image(req)
            latents = engine.denoise_contexts(prepared.contexts, req.sampler(), prepared.noise)
            results.setdefault(f"{cfg}x{seq}", []).append(latents.float().cpu())
    captured = [(k[0], k[1], k[-1]) for k, c in pipe.dit._graphs._captured.items() if c is not None]
    torch.save({"results": results, "captured": captured}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_parallel_denoising_with_graphs_gives_its_eager_latents(gpu_pipeline, tmp_path):
    """Two ranks on one GPU, CFG 2 (cond over both ranks outside cfg_interval) and sequence 2:
    the layers replayed as graphs between the Ulysses all-to-alls give the eager latents, bit
    for bit, and each rank captured its own rows' shapes (its markers in the key)."""
    from bagel_ray.model.tiny import make_tiny_model
    from tests.engine.test_dit_parallel import free_port

    model_dir = make_tiny_model(tmp_path / "tiny")
    torch.multiprocessing.spawn(_parallel_rank, args=(2, free_port(), str(model_dir), str(tmp_path)), nprocs=2)
    h, w = gpu_pipeline.dit.latent_grid(64, 64)
    half = (h * w + 2) // 2
    for rank in range(2):
        saved = torch.load(tmp_path / f"{rank}.pt")
        for grid, (eager, captured, replayed) in saved["results"].items():
            assert torch.equal(captured, eager) and torch.equal(replayed, eager), f"rank {rank}, {grid}"
        markers = (True, False) if rank == 0 else (False, True)
        # CFG 2: each branch whole on its rank, cond split over both; sequence 2: one block, split
        assert {(1, h * w + 2, (True, True)), (1, half, markers)} <= set(saved["captured"]), rank


def test_a_parallel_rank_runs_its_layers_through_the_graphs_only_when_asked(pipeline, monkeypatch):
    """`ParallelDiT.cuda_graphs` (a replica's `dit.parallel.cuda_graphs`) decides whether a
    rank's forwards go through `DitGraphs`, with its markers as the shape's tag; off, they never
    do, whatever the DiT's own setting (a one-rank group in this process, on the CPU)."""
    import torch.distributed as dist

    from bagel_ray.engine.dit_parallel import ParallelConfig, ParallelDiT
    from tests.engine.test_dit_parallel import free_port

    tags = []
    graphs = pipeline.dit._graphs

    def spy(*args):
        tags.append(args[-1])
        return graphs(*args)

    monkeypatch.setattr(pipeline.dit, "_graphs", spy)
    req = GenerationRequest("text2img", PROMPTS[0], seed=3, num_inference_steps=3, height=64, width=64)
    prepared = pipeline.prepare_image(req)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        engine = ParallelDiT(pipeline.dit, ParallelConfig(1, 1))
        assert not engine.cuda_graphs  # the default
        eager = engine.denoise_contexts(prepared.contexts, req.sampler(), prepared.noise)
        assert tags == []
        engine.cuda_graphs = True
        graphed = engine.denoise_contexts(prepared.contexts, req.sampler(), prepared.noise)
        assert tags and set(tags) == {(True, True)}  # one rank: its block has both markers
    finally:
        dist.destroy_process_group()
    assert torch.equal(graphed, eager)  # on the CPU `DitGraphs` runs the eager forward
