"""The KV context and the three CFG branches of image generation (spec 6.1, 9.1, 9.2)."""

from __future__ import annotations

import pytest
import torch

from bagel_ray.engine.kv_context import Cut, ImageContexts, KVContext
from bagel_ray.engine.request import GenerationRequest

LAYERS, KV_HEADS, HEAD_DIM = 3, 2, 4


def block(n: int, seed: int, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(1, n, KV_HEADS, HEAD_DIM, generator=g).to(dtype), torch.randn(1, n, KV_HEADS, HEAD_DIM, generator=g).to(dtype))
        for _ in range(LAYERS)
    ]


def empty(dtype: torch.dtype = torch.float32) -> KVContext:
    return KVContext.empty(LAYERS, KV_HEADS, HEAD_DIM, dtype)


def test_empty():
    ctx = empty()
    assert ctx.length == 0 and ctx.rope == 0 and ctx.nbytes == 0
    assert ctx.kv.shape == (LAYERS, 2, 0, KV_HEADS, HEAD_DIM)
    assert ctx.cut == Cut(0, 0)


def test_append_layout_and_rope():
    """A text block of 5 advances rope by 5; an image block of 7 rows advances it by 1."""
    text, image = block(5, 0), block(7, 1)
    ctx = empty().append(text, 5)
    assert (ctx.length, ctx.rope) == (5, 5)
    ctx2 = ctx.append(image, 1)
    assert (ctx2.length, ctx2.rope) == (12, 6)
    assert ctx2.cut == Cut(12, 6)
    for i in range(LAYERS):
        k, v = ctx2.layer(i)
        assert k.shape == v.shape == (12, KV_HEADS, HEAD_DIM)
        assert torch.equal(k[:5], text[i][0][0]) and torch.equal(v[:5], text[i][1][0])
        assert torch.equal(k[5:], image[i][0][0]) and torch.equal(v[5:], image[i][1][0])
    # Immutable: appending returned new contexts and left the old ones alone.
    assert (ctx.length, ctx.rope) == (5, 5)
    with pytest.raises(AttributeError):
        ctx.rope = 3  # type: ignore[misc]


def test_append_casts_to_context_dtype():
    ctx = empty(torch.bfloat16).append(block(3, 2), 3)
    assert ctx.kv.dtype == torch.bfloat16
    assert torch.equal(ctx.layer(0)[0], block(3, 2)[0][0][0].to(torch.bfloat16))


def test_prefix():
    ctx = empty().append(block(5, 0), 5).append(block(7, 1), 1)
    cut = Cut(5, 5)
    pre = ctx.prefix(cut)
    assert (pre.length, pre.rope) == (5, 5)
    assert torch.equal(pre.kv, ctx.kv[:, :, :5])
    assert torch.equal(pre.kv, empty().append(block(5, 0), 5).kv)
    assert ctx.prefix(Cut(0, 0)).length == 0
    assert ctx.prefix(ctx.cut).cut == ctx.cut
    with pytest.raises(ValueError):
        ctx.prefix(Cut(13, 7))


def test_nbytes():
    ctx = empty(torch.bfloat16).append(block(10, 0), 10)
    assert ctx.nbytes == LAYERS * 2 * 10 * KV_HEADS * HEAD_DIM * 2
    assert empty(torch.float32).append(block(10, 0), 10).nbytes == 2 * ctx.nbytes
    # Spec 9.1 at 7B size: 56 KiB per token over 28 layers in bf16.
    assert KVContext(torch.empty(28, 2, 1, 4, 128, dtype=torch.bfloat16), 1).nbytes == 57_344


def test_text2img_branches():
    """t2i without think: cfg_text is the empty prefix, cfg_img is gen itself."""
    gen = empty().append(block(6, 0), 6)
    ctxs = ImageContexts(gen, Cut(0, 0), gen.cut, 64, 64)
    assert ctxs.branch("cond") is gen
    assert ctxs.branch("cfg_text").length == 0 and ctxs.branch("cfg_text").rope == 0
    assert torch.equal(ctxs.branch("cfg_img").kv, gen.kv) and ctxs.branch("cfg_img").rope == gen.rope
    assert ctxs.same_as_gen("cfg_img")
    assert not ctxs.same_as_gen("cfg_text")
    assert ctxs.nbytes == gen.nbytes
    with pytest.raises(ValueError):
        ctxs.branch("uncond")


def test_text2img_think_branches():
    """t2i with think: cfg_text = [sys], cfg_img = [sys] prompt, both strict prefixes of gen."""
    sys_ctx = empty().append(block(4, 0), 4)
    prompt_ctx = sys_ctx.append(block(3, 1), 3)
    gen = prompt_ctx.append(block(5, 2), 5)
    ctxs = ImageContexts(gen, sys_ctx.cut, prompt_ctx.cut, 64, 64)
    assert not ctxs.same_as_gen("cfg_img") and not ctxs.same_as_gen("cfg_text")
    assert torch.equal(ctxs.branch("cfg_img").kv, prompt_ctx.kv)
    assert torch.equal(ctxs.branch("cfg_text").kv, sys_ctx.kv)


def test_img2img_branches():
    """Edits: cfg_img is a context of its own (text at other positions), never 'same as gen'."""
    gen = empty().append(block(9, 0), 1).append(block(4, 1), 4)
    cfg_img = empty().append(block(4, 2), 4)
    ctxs = ImageContexts(gen, Cut(9, 1), cfg_img, 32, 48)
    assert ctxs.branch("cfg_img") is cfg_img
    assert not ctxs.same_as_gen("cfg_img") and not ctxs.same_as_gen("cfg_text")
    assert (ctxs.branch("cfg_text").length, ctxs.branch("cfg_text").rope) == (9, 1)
    assert ctxs.nbytes == gen.nbytes + cfg_img.nbytes


# -- contexts built by the pipeline on the tiny model -----------------------------------------


def test_edit_prefix_property(pipeline, image):
    """In an edit, the cfg_text context ([VAE] [ViT]) built on its own is bit-identical to the
    first rows of gen (spec 9.1); cfg_img (the prompt alone) is not a prefix."""
    req = GenerationRequest("img2img", "make it blue", image=image, seed=3)
    ctxs = pipeline.prepare_image(req).contexts
    th = pipeline.thinker
    resized = pipeline.vae_resized(image)
    alone = th.append_vit(th.append_vae(th.empty(), resized, torch.Generator().manual_seed(3)), resized)
    assert ctxs.cfg_text == alone.cut
    assert torch.equal(ctxs.gen.kv[:, :, : alone.length], alone.kv)
    assert torch.equal(ctxs.branch("cfg_text").kv, alone.kv)
    # cfg_img: the same prompt at positions 0.. instead of 2.., so different keys.
    assert isinstance(ctxs.cfg_img, KVContext)
    n = ctxs.cfg_img.length
    assert ctxs.cfg_img.rope == n
    prompt_rows = ctxs.gen.kv[:, :, -n:]
    # Layer 0 values depend on the tokens only; keys carry RoPE of other positions.
    assert torch.equal(ctxs.cfg_img.kv[0, 1], prompt_rows[0, 1])
    assert not torch.equal(ctxs.cfg_img.kv[0, 0], prompt_rows[0, 0])


def test_text2img_contexts_from_pipeline(pipeline):
    req = GenerationRequest("text2img", "a cat", height=32, width=48)
    ctxs = pipeline.prepare_image(req).contexts
    n = len(pipeline.thinker.tokenizer.text_segment("a cat"))
    assert (ctxs.gen.length, ctxs.gen.rope) == (n, n)
    assert ctxs.cfg_text == Cut(0, 0)
    assert ctxs.cfg_img == ctxs.gen.cut and ctxs.same_as_gen("cfg_img")
    assert (ctxs.height, ctxs.width) == (32, 48)
