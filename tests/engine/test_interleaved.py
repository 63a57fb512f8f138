"""A request's `context` (a chat's system message, earlier turns, other images) is placed as
the official `interleave_inference` places a list of inputs (spec 6.1): texts in gen and
cfg_img, images (VAE + ViT) in gen only, cfg_text = gen before the prompt, the output at the
last image's size; and the text's tokens count against `max_model_len`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bagel_ray.engine.errors import PromptTooLong
from bagel_ray.engine.kv_context import KVContext
from bagel_ray.engine.pipeline import LocalPipeline
from bagel_ray.engine.request import GenerationRequest


def segment(pipeline, text: str) -> int:
    return len(pipeline.thinker_engine.tokenizer.text_segment(text))


def image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_text_context_is_prefilled_before_the_prompt(pipeline):
    th = pipeline.thinker_engine
    req = GenerationRequest("text2text", "Another?", context=("Answer briefly.", "Name a planet.", "Mars."))
    built = pipeline.understanding_context(req)
    by_hand = th.empty()
    for text in (*req.context, req.prompt):
        by_hand = th.append_text(by_hand, text)
    assert built.length == by_hand.length and torch.equal(built.kv, by_hand.kv)


def test_edit_contexts_with_a_text_and_two_images(pipeline):
    first, second = image(48, 64, 1), image(64, 32, 2)
    req = GenerationRequest("img2img", "make it blue", image=second, context=("watercolour", first))
    contexts, _, _ = pipeline.build_contexts(req, torch.Generator().manual_seed(0))
    resized = pipeline.vae_resized(second)
    assert (contexts.height, contexts.width) == (resized.height, resized.width)  # the last image's size
    texts = segment(pipeline, "watercolour") + segment(pipeline, "make it blue")
    assert isinstance(contexts.cfg_img, KVContext) and contexts.cfg_img.length == texts  # no image rows
    assert contexts.gen.length - contexts.cfg_text.length == segment(pipeline, "make it blue")
    assert contexts.gen.rope == 2 * 2 + texts  # each image block: a VAE and a ViT position


def test_text2img_context_keeps_cfg_img_a_cut_of_gen(pipeline):
    req = GenerationRequest("text2img", "a fox", height=32, width=32, context=("Paint in watercolour.",))
    contexts, _, _ = pipeline.build_contexts(req, torch.Generator().manual_seed(0))
    assert contexts.cfg_img.length == contexts.gen.length
    assert contexts.cfg_text.length == segment(pipeline, "Paint in watercolour.")


def test_context_text_counts_against_max_model_len(pipeline):
    limited = LocalPipeline(pipeline.thinker, pipeline.dit, max_model_len=40)
    history = ("many words " * 5,) * 3
    assert segment(pipeline, history[0]) < 40 < sum(segment(pipeline, t) for t in history)
    with pytest.raises(PromptTooLong):
        limited.prompt_tokens(GenerationRequest("text2text", "hi", max_tokens=1, context=history))


def test_images_in_the_context_set_the_modality():
    picture = image(32, 32, 0)
    with pytest.raises(ValueError, match="takes no input image"):
        GenerationRequest("text2text", "hi", context=(picture,))
    GenerationRequest("img2text", "hi", context=(picture,))  # an image of an earlier turn is an input image
    with pytest.raises(ValueError, match="texts or images"):
        GenerationRequest("text2text", "hi", context=(3,))
