"""The MoT language model: RoPE positions, masks, RMSNorm, RoPE, expert routing and batching
(spec 3.3-3.6, 6.1, 11.2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bagel_ray.engine.decoder import DecodeParams
from bagel_ray.engine.request import GenerationRequest
from bagel_ray.model.image_transforms import grid_position_ids
from bagel_ray.model.kernels.rope import apply_rope, rotate_half
from bagel_ray.model.llm import ExpertRows, PrefixKV, RMSNorm, attention_mask, rope_cos_sin, rope_inv_freq, route


def rows_of(gen_mask: torch.Tensor) -> ExpertRows:
    """The expert rows of a boolean [B, N] mask (True = gen)."""
    flat = gen_mask.reshape(-1)
    return ExpertRows(flat.to(torch.int32), torch.nonzero(~flat).flatten())


# -- RoPE positions of mixed contexts ---------------------------------------------------------


def test_edit_positions_and_lengths(pipeline, image):
    """Edit without think (spec 6.1): VAE block at 0, ViT block at 1, prompt at 2..2+n-1; next
    rope 2+n; KV length (h*w+2)+(m+2)+n. cfg_img holds the prompt at 0..n-1. The generated block
    sits at 2+n in gen, 2 in cfg_text and n in cfg_img."""
    prompt = "make the sky green"
    req = GenerationRequest("img2img", prompt, image=image, num_inference_steps=3)
    calls: list[list[list[int]]] = []
    hook = pipeline.thinker.model.llm.register_forward_pre_hook(lambda _m, args: calls.append(args[1].tolist()))
    try:
        prepared = pipeline.prepare_image(req)
        n = len(pipeline.thinker.tokenizer.text_segment(prompt))
        ctxs = prepared.contexts
        resized = pipeline.vae_resized(image)
        hw = (ctxs.height // 16) * (ctxs.width // 16)
        m = pipeline.thinker.builder.vit_block(resized).rows.shape[0]
        assert (ctxs.height, ctxs.width) == (resized.height, resized.width)
        assert calls[0] == [[0] * (hw + 2)]  # VAE block, one position
        assert calls[1] == [[1] * (m + 2)]  # ViT block, one position
        assert calls[2] == [list(range(2, 2 + n))]  # prompt in gen
        assert calls[3] == [list(range(n))]  # prompt in cfg_img
        assert (ctxs.gen.rope, ctxs.gen.length) == (2 + n, (hw + 2) + (m + 2) + n)
        assert (ctxs.cfg_text.rope, ctxs.cfg_text.length) == (2, (hw + 2) + (m + 2))
        assert (ctxs.cfg_img.rope, ctxs.cfg_img.length) == (n, n)
        calls.clear()
        pipeline.render(req, prepared)  # 2 evaluations, all three branches (interval [0, 1])
    finally:
        hook.remove()
    query = hw + 2
    assert calls == [[[2 + n] * query, [2] * query, [n] * query]] * 2


def test_text_then_image_positions(pipeline, image):
    """An image block takes one position whatever its size; text takes one per token."""
    th = pipeline.thinker
    n1 = len(th.tokenizer.text_segment("first"))
    ctx = th.append_text(th.empty(), "first")
    assert (ctx.length, ctx.rope) == (n1, n1)
    ctx = th.append_vit(ctx, pipeline.vae_resized(image))
    m = th.builder.vit_block(pipeline.vae_resized(image)).rows.shape[0]
    assert (ctx.length, ctx.rope) == (n1 + m + 2, n1 + 1)


# -- attention masks ---------------------------------------------------------------------------


def test_attention_mask_causal_bottom_right_with_padding():
    """Sample 0: 2 cached rows and 3 new; sample 1: 1 cached row (of 2) and 2 new (of 3)."""
    mask = attention_mask(torch.tensor([2, 1]), 2, torch.tensor([3, 2]), 3, causal=True)
    assert mask.shape == (2, 3, 5) and mask.dtype == torch.bool
    expected = torch.tensor(
        [
            [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]],
            [[1, 0, 1, 0, 0], [1, 0, 1, 1, 0], [1, 0, 1, 1, 0]],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def test_attention_mask_full_blocks():
    """Non-causal (image blocks): every query sees the valid context and every valid new row."""
    mask = attention_mask(torch.tensor([3, 0]), 3, torch.tensor([2, 1]), 2, causal=False)
    expected = torch.tensor(
        [
            [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]],
            [[0, 0, 0, 1, 0], [0, 0, 0, 1, 0]],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def test_attention_mask_without_cache():
    mask = attention_mask(torch.tensor([0]), 0, torch.tensor([3]), 3, causal=True)
    assert torch.equal(mask[0], torch.tril(torch.ones(3, 3, dtype=torch.bool)))


# -- RMSNorm -----------------------------------------------------------------------------------


def test_rmsnorm_by_hand():
    norm = RMSNorm(2, eps=1e-6)
    norm.weight.data = torch.tensor([2.0, 0.5])
    out = norm(torch.tensor([[3.0, 4.0]]))
    rms = (12.5 + 1e-6) ** 0.5
    torch.testing.assert_close(out, torch.tensor([[2 * 3 / rms, 0.5 * 4 / rms]]), rtol=1e-6, atol=0)


def test_rmsnorm_bf16_rounding_order():
    """bf16 input: normalise in fp32, cast to bf16, then times the bf16 weight (two roundings)."""
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(64, 128, generator=g)).to(torch.bfloat16)
    w = (1 + 0.3 * torch.randn(128, generator=g)).to(torch.bfloat16)
    norm = RMSNorm(128, eps=1e-6).to(torch.bfloat16)
    norm.weight.data = w
    out = norm(x)
    x32 = x.float()
    normed = x32 / torch.sqrt((x32 * x32).mean(-1, keepdim=True) + 1e-6)
    expected = w * normed.to(torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # The order matters: one rounding after an fp32 product gives other bits.
    one_rounding = (w.float() * normed).to(torch.bfloat16)
    assert not torch.equal(out, one_rounding)


def test_rmsnorm_fp32_input_bf16_weight_promotes():
    """The gen-mode QK-norm: fp32 input and bf16 weight give fp32 (spec 3.3)."""
    norm = RMSNorm(16, eps=1e-6).to(torch.bfloat16)
    norm.weight.data = torch.linspace(0.5, 1.5, 16).to(torch.bfloat16)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    out = norm(x)
    assert out.dtype == torch.float32
    expected = norm.weight.float() * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)


# -- RoPE --------------------------------------------------------------------------------------


def test_rope_inv_freq():
    inv = rope_inv_freq(128, 1e6)
    assert inv.shape == (64,) and inv.dtype == torch.float32
    expected = torch.tensor([1.0 / 1e6 ** (2 * k / 128) for k in range(64)])
    torch.testing.assert_close(inv, expected, rtol=1e-6, atol=0)


def test_apply_rope_equals_rotate_half_formula():
    """x'[k] = x[k] cos(p f_k) - x[k+h] sin(p f_k); x'[k+h] = x[k+h] cos(p f_k) + x[k] sin(p f_k)."""
    d, h = 16, 8
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 3, d, generator=g, dtype=torch.float64)
    positions = torch.tensor([[0, 1, 2, 7, 7], [4, 4, 4, 5, 100]])
    inv = rope_inv_freq(d, 1e4).double()
    cos, sin = rope_cos_sin(positions, inv, torch.float64)
    out = apply_rope(x, cos, sin)
    expected = torch.empty_like(x)
    for b in range(2):
        for n in range(5):
            for k in range(h):
                a = float(positions[b, n]) * float(inv[k])
                c, s = np.cos(a), np.sin(a)
                expected[b, n, :, k] = x[b, n, :, k] * c - x[b, n, :, k + h] * s
                expected[b, n, :, k + h] = x[b, n, :, k + h] * c + x[b, n, :, k] * s
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(rotate_half(torch.arange(4.0)), torch.tensor([-2.0, -3.0, 0.0, 1.0]))


def test_rope_relative_positions():
    """q . k after RoPE depends only on the position difference."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 1, 1, 32, generator=g, dtype=torch.float64), torch.randn(1, 1, 1, 32, generator=g, dtype=torch.float64)
    inv = rope_inv_freq(32, 1e6).double()

    def dot(pq: int, pk: int) -> float:
        cq, sq = rope_cos_sin(torch.tensor([[pq]]), inv, torch.float64)
        ck, sk = rope_cos_sin(torch.tensor([[pk]]), inv, torch.float64)
        return float((apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum())

    assert dot(10, 3) == pytest.approx(dot(107, 100), abs=1e-9)
    assert dot(0, 0) == pytest.approx(float((q * k).sum()), abs=1e-12)


def test_rope_cos_sin_cast_to_sequence_dtype():
    """cos/sin are computed in fp32 from the positions, then cast (spec 3.4, 11.4)."""
    positions = torch.tensor([[0, 5, 1000]])
    inv = rope_inv_freq(128, 1e6)
    cos, sin = rope_cos_sin(positions, inv, torch.bfloat16)
    assert cos.dtype == sin.dtype == torch.bfloat16 and cos.shape == (1, 3, 128)
    angles = positions.float()[..., None] * inv
    emb = torch.cat((angles, angles), -1)
    assert torch.equal(cos, emb.cos().to(torch.bfloat16))
    assert torch.equal(sin, emb.sin().to(torch.bfloat16))


# -- expert routing ----------------------------------------------------------------------------


def test_route_sends_rows_to_their_expert():
    g = torch.Generator().manual_seed(4)
    und, gen = nn.Linear(6, 3), nn.Linear(6, 3)
    with torch.no_grad():
        und.weight.copy_(torch.randn(3, 6, generator=g))
        gen.weight.copy_(torch.randn(3, 6, generator=g))
    x = torch.randn(2, 4, 6, generator=g)
    gen_mask = torch.tensor([[False, True, True, False], [True, False, False, False]])
    with torch.no_grad():
        out = route(x, rows_of(gen_mask), und, gen)
        for b in range(2):
            for n in range(4):
                expert = gen if gen_mask[b, n] else und
                torch.testing.assert_close(out[b, n], expert(x[b, n]), rtol=1e-6, atol=1e-6)
        assert torch.equal(route(x, None, und, gen), und(x))
        torch.testing.assert_close(route(x, rows_of(torch.zeros(2, 4, dtype=torch.bool)), und, gen), und(x))


def test_block_markers_layout():
    """Image blocks: the first and last row of each sample are und, the rest gen."""
    rows = ExpertRows.block_markers(2, 5, "cpu")
    want = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 1, 0]])
    assert torch.equal(rows.experts.view(2, 5), want.to(rows.experts.dtype))
    assert rows.und_index.tolist() == [0, 4, 5, 9]


def test_route_promotes_to_the_wider_dtype():
    """gen-mode QK-norm returns fp32 for gen rows while und rows stay bf16: the output is fp32."""
    x = torch.randn(1, 3, 4).to(torch.bfloat16)
    out = route(x, rows_of(torch.tensor([[False, True, False]])), lambda r: r * 2, lambda r: r.float() / 3)
    assert out.dtype == torch.float32
    assert torch.equal(out[0, 0], (x[0, 0] * 2).float())
    assert torch.equal(out[0, 1], x[0, 1].float() / 3)


# -- batching ----------------------------------------------------------------------------------


def _two_contexts(pipeline, image):
    """Contexts of different lengths, one with an image (rope != length)."""
    th = pipeline.thinker
    a = th.append_text(th.append_vit(th.empty(), pipeline.vae_resized(image)), "describe this picture please")
    b = th.append_text(th.empty(), "hi")
    assert a.length != b.length and a.rope != a.length
    return a, b


def test_batched_decode_equals_separate(pipeline, image):
    a, b = _two_contexts(pipeline, image)
    params = DecodeParams(max_new_tokens=12)
    both = pipeline.thinker.decode([a, b], params, keep_logits=True)
    alone = [pipeline.thinker.decode([c], params, keep_logits=True)[0] for c in (a, b)]
    for x, y in zip(both, alone):
        assert x.token_ids == y.token_ids
        assert x.stopped_on_eos == y.stopped_on_eos
        assert len(x.token_ids) > 0
        torch.testing.assert_close(x.logits, y.logits, rtol=0, atol=1e-5)


def test_batched_velocities_equal_separate(pipeline, image):
    """The DiT's CFG branches run as one padded batch; each equals its own forward."""
    a, b = _two_contexts(pipeline, image)
    dit = pipeline.dit
    h, w = 2, 3
    x = torch.randn(h * w, 64, generator=torch.Generator().manual_seed(5))
    t = torch.tensor(0.7)
    pos = grid_position_ids(h, w, pipeline.cfg.max_latent_size)
    empty = dit.builder.empty()
    both = dit.velocities(x, t, [a, b, empty], pos)
    for k, ctx in enumerate((a, b, empty)):
        torch.testing.assert_close(both[k], dit.velocities(x, t, [ctx], pos)[0], rtol=0, atol=1e-5)


def test_batched_llm_forward_equals_separate(pipeline, image):
    """Padded cache and padded new rows, causal: valid rows match separate forwards."""
    a, b = _two_contexts(pipeline, image)
    model = pipeline.thinker.model
    g = torch.Generator().manual_seed(6)
    new = [torch.randn(n, model.cfg.llm.hidden_size, generator=g) for n in (4, 2)]
    width, N = max(a.length, b.length), 4
    past = []
    for i in range(model.cfg.llm.num_hidden_layers):
        k = torch.zeros(2, width, *a.kv.shape[3:])
        v = torch.zeros_like(k)
        for j, c in enumerate((a, b)):
            k[j, : c.length], v[j, : c.length] = c.layer(i)
        past.append((k, v))
    embeds = torch.zeros(2, N, model.cfg.llm.hidden_size)
    embeds[0], embeds[1, :2] = new[0], new[1]
    positions = torch.stack([torch.arange(c.rope, c.rope + N) for c in (a, b)])
    mask = attention_mask(torch.tensor([a.length, b.length]), width, torch.tensor([4, 2]), N, causal=True)
    with torch.inference_mode():
        hidden, kv = model.llm(embeds, positions, None, PrefixKV(past, mask))
        for j, c in enumerate((a, b)):
            n = new[j].shape[0]
            single_mask = attention_mask(torch.tensor([c.length]), c.length, torch.tensor([n]), n, causal=True)
            single_past = [(k[None], v[None]) for k, v in (c.layer(i) for i in range(len(past)))]
            h1, kv1 = model.llm(new[j][None], positions[j : j + 1, :n], None, PrefixKV(single_past, single_mask))
            torch.testing.assert_close(hidden[j, :n], h1[0], rtol=0, atol=1e-5)
            for (kb, vb), (k1, v1) in zip(kv, kv1):
                torch.testing.assert_close(kb[j, :n], k1[0], rtol=0, atol=1e-5)
                torch.testing.assert_close(vb[j, :n], v1[0], rtol=0, atol=1e-5)


def test_the_stacked_norm_weights_follow_the_weights():
    """The und/gen norm pair is stacked once; a change of either weight (in place, or a new
    tensor) is seen by the next call."""
    from bagel_ray.model.llm import RMSNorm, _weights

    und, gen = RMSNorm(8, 1e-6), RMSNorm(8, 1e-6)
    rows = ExpertRows.block_markers(1, 3, "cpu")
    with torch.no_grad():
        first = _weights(rows, und, gen)
        assert _weights(rows, und, gen) is first
        gen.weight.mul_(3)
        assert torch.equal(_weights(rows, und, gen)[1], gen.weight)
        und.weight = torch.nn.Parameter(torch.full((8,), 2.0))
        assert torch.equal(_weights(rows, und, gen), torch.stack((und.weight, gen.weight)))
    with torch.inference_mode():
        inside = _weights(rows, und, gen)
    assert inside.is_inference() and not _weights(rows, und, gen).is_inference()
    assert torch.equal(_weights(None, und, gen), und.weight[None])
