"""The official `openai` Python SDK against the session's tiny Serve app, as an OpenAI user
drives it. Each answer is checked against `LocalPipeline` with the interleaved input the
README says the request maps to, so a wrong mapping fails here. The README section "Use it
from the OpenAI SDK" quotes these tests' client code."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from bagel_ray.engine.request import GenerationRequest

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def client(serve_app):
    return openai.OpenAI(base_url=serve_app.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def pictures(picture):
    return picture, picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def test_system_and_multi_turn_history(client, local):
    # README: chat with history
    reply = client.chat.completions.create(
        model="bagel",
        messages=[
            {"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": "Name a planet."},
            {"role": "assistant", "content": "Mars."},
            {"role": "user", "content": "Another one?"},
        ],
        max_completion_tokens=8,
        seed=3,
    )
    # the interleaved input it maps to: one text segment per message, no role tags
    want = local.run(GenerationRequest("text2text", "Another one?", max_tokens=8, seed=3,
                                       context=("You answer in one word.", "Name a planet.", "Mars.")))
    assert reply.choices[0].message.content == want.text
    assert reply.usage.completion_tokens == len(want.token_ids)
    assert reply.usage.prompt_tokens == want.prompt_tokens > 0
    assert reply.usage.total_tokens == want.prompt_tokens + len(want.token_ids)


def test_stream_with_usage(client, local):
    # README: streaming with usage
    stream = client.chat.completions.create(
        model="bagel",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the moon."}],
        max_tokens=6, seed=1, stream=True, stream_options={"include_usage": True},
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage
    want = local.run(GenerationRequest("text2text", "Tell me about the moon.", max_tokens=6, seed=1, context=("Be brief.",)))
    assert text == want.text
    assert (usage.prompt_tokens, usage.completion_tokens) == (want.prompt_tokens, len(want.token_ids))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_temperature_samples_and_its_absence_is_greedy(client, local):
    messages = [{"role": "user", "content": "Say something."}]
    # README: sampling
    sampled = client.chat.completions.create(model="bagel", messages=messages, temperature=1.5, max_tokens=8, seed=7)
    greedy = client.chat.completions.create(model="bagel", messages=messages, max_tokens=8, seed=7)
    forced = client.chat.completions.create(model="bagel", messages=messages, temperature=1.5, max_tokens=8, seed=7,
                                            extra_body={"do_sample": False})
    want_sampled = local.run(GenerationRequest("text2text", "Say something.", max_tokens=8, seed=7, do_sample=True,
                                               temperature=1.5))
    want_greedy = local.run(GenerationRequest("text2text", "Say something.", max_tokens=8, seed=7))
    assert want_sampled.text != want_greedy.text  # else this test could not tell them apart
    assert sampled.choices[0].message.content == want_sampled.text
    assert greedy.choices[0].message.content == want_greedy.text
    assert forced.choices[0].message.content == want_greedy.text


def test_several_images_in_one_turn(client, local, pictures):
    first, second = pictures
    # README: several images
    reply = client.chat.completions.create(
        model="bagel",
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(first)}},
            {"type": "image_url", "image_url": {"url": data_url(second)}},
            {"type": "text", "text": "What differs?"},
        ]}],
        max_tokens=6,
    )
    want = local.run(GenerationRequest("img2text", "What differs?", image=second, max_tokens=6, seed=reply.seed,
                                       context=(first,)))
    assert reply.choices[0].message.content == want.text
    assert reply.usage.prompt_tokens == want.prompt_tokens


def test_chat_history_conditions_image_output(client, local):
    reply = client.chat.completions.create(
        model="bagel",
        messages=[{"role": "system", "content": "Paint in watercolour."}, {"role": "user", "content": "a red fox"}],
        extra_body={"modalities": ["image"], "size": "32x32", "num_inference_steps": 3, "seed": 4},
    )
    url = reply.choices[0].message.content[-1]["image_url"]["url"]
    got = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    want = local.run(GenerationRequest("text2img", "a red fox", height=32, width=32, num_inference_steps=3, seed=4,
                                       context=("Paint in watercolour.",)))
    assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want.image.convert("RGB")))


@pytest.mark.parametrize("kwargs,param", [
    ({"max_tokens": 2, "max_completion_tokens": 2}, None),  # the same knob twice
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "messages"),
])
def test_refusals_name_the_problem(client, kwargs, param):
    body = {"model": "bagel", "messages": [{"role": "user", "content": "hi"}], **kwargs}
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(**body)
    assert err.value.status_code in (400, 422)
    assert err.value.body["param"] == param and err.value.body["message"]


def test_more_than_four_images_is_refused(client, picture):
    parts = [{"type": "image_url", "image_url": {"url": data_url(picture)}}] * 5
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="bagel", messages=[{"role": "user", "content": parts}], max_tokens=2)
    assert "at most 4 images" in err.value.body["message"]
