"""What a request carries to each stage: the DiT's copy of an edit leaves its image behind."""

from __future__ import annotations

import pytest
from PIL import Image

from bagel_ray.engine.pipeline import LocalPipeline
from bagel_ray.engine.request import GenerationRequest


def test_for_render_leaves_an_edits_image_behind_and_keeps_the_rest():
    edit = GenerationRequest("img2img", "Make it night.", image=Image.new("RGB", (32, 32)), seed=4, num_inference_steps=3,
                             cfg_img_scale=1.5)
    sent = edit.for_render()
    assert sent.image is None and sent.image_in_contexts and not edit.image_in_contexts
    assert (sent.modality, sent.prompt, sent.seed, sent.sampler()) == (edit.modality, edit.prompt, edit.seed, edit.sampler())
    text = GenerationRequest("text2img", "a fox", height=32, width=32)
    assert text.for_render() is text
    with pytest.raises(ValueError, match="needs an input image"):
        GenerationRequest("img2img", "no picture")


def test_a_request_without_its_image_cannot_build_contexts(pipeline: LocalPipeline):
    sent = GenerationRequest("img2img", "Make it night.", image=Image.new("RGB", (32, 32))).for_render()
    with pytest.raises(ValueError, match="contexts built elsewhere"):
        pipeline.prepare_image(sent)
