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

from bagel_ray.engine.request import GenerationRequest, preview_steps

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
    zero = client.chat.completions.create(model="bagel", messages=messages, temperature=0, max_tokens=8, seed=7)
    forced = client.chat.completions.create(model="bagel", messages=messages, temperature=1.5, max_tokens=8, seed=7,
                                            extra_body={"do_sample": False})
    want_sampled = local.run(GenerationRequest("text2text", "Say something.", max_tokens=8, seed=7, do_sample=True,
                                               temperature=1.5))
    want_greedy = local.run(GenerationRequest("text2text", "Say something.", max_tokens=8, seed=7))
    assert want_sampled.text != want_greedy.text  # else this test could not tell them apart
    assert sampled.choices[0].message.content == want_sampled.text
    assert greedy.choices[0].message.content == want_greedy.text
    assert zero.choices[0].message.content == want_greedy.text
    assert forced.choices[0].message.content == want_greedy.text
    with pytest.raises(openai.UnprocessableEntityError) as err:  # sampling at temperature 0 contradicts itself
        client.chat.completions.create(model="bagel", messages=messages, temperature=0, max_tokens=8,
                                       extra_body={"do_sample": True})
    assert "do_sample needs a temperature > 0" in err.value.body["message"]


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


def b64_image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_generate_auto_size_quality_and_formats(client, local):
    # README: images
    png = client.images.generate(model="bagel", prompt="a lighthouse", size="auto", quality="low",
                                 extra_body={"seed": 11})
    jpeg = client.images.generate(model="bagel", prompt="a lighthouse", size="32x32", quality="low",
                                  output_format="jpeg", output_compression=50, extra_body={"seed": 11})
    webp = client.images.generate(model="bagel", prompt="a lighthouse", size="32x32", quality="low",
                                  output_format="webp", background="opaque", moderation="low", extra_body={"seed": 11})
    default = min(1024, local.cfg.max_image_side)  # auto: the official default size
    want = local.run(GenerationRequest("text2img", "a lighthouse", seed=11, num_inference_steps=20,
                                       height=default, width=default))
    got = b64_image(png.data[0].b64_json)
    assert got.format == "PNG" and png.output_format == "png" and png.size == f"{default}x{default}"
    assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want.image))  # quality low = 20 steps
    assert b64_image(jpeg.data[0].b64_json).format == "JPEG" and jpeg.output_format == "jpeg"
    lossless = client.images.generate(model="bagel", prompt="a lighthouse", size="32x32", quality="low",
                                      output_format="jpeg", output_compression=100, extra_body={"seed": 11})
    assert len(base64.b64decode(jpeg.data[0].b64_json)) < len(base64.b64decode(lossless.data[0].b64_json))
    assert b64_image(webp.data[0].b64_json).format == "WEBP"


@pytest.mark.parametrize("quality,steps", [("medium", 30), ("high", 50), ("auto", 50)])
def test_quality_is_the_step_count_the_readme_states(client, local, quality, steps):
    got = client.images.generate(model="bagel", prompt="a lighthouse", size="32x32", quality=quality,
                                 extra_body={"seed": 11})
    want = local.run(GenerationRequest("text2img", "a lighthouse", seed=11, num_inference_steps=steps, height=32, width=32))
    assert np.array_equal(np.asarray(b64_image(got.data[0].b64_json).convert("RGB")), np.asarray(want.image))


@pytest.mark.parametrize("kwargs,param,words", [
    ({"background": "transparent"}, "background", "opaque"),
    ({"moderation": "auto"}, "moderation", "no moderation"),
    ({"response_format": "url"}, "response_format", "b64_json"),
    ({"output_compression": 50}, "output_compression", "png is lossless"),
    ({"quality": "low", "extra_body": {"num_inference_steps": 3}}, "quality", "not both"),
    ({"size": "40x40"}, "size", "multiple of 16"),
])
def test_image_options_refused_with_the_reason(client, kwargs, param, words):
    with pytest.raises(openai.APIStatusError) as err:
        client.images.generate(model="bagel", prompt="x", **kwargs)
    assert err.value.status_code == 422
    assert err.value.body["param"] == param and words in err.value.body["message"]


@pytest.mark.parametrize("size", ["8192x8192", "144x32", "1536x1024"])
def test_sizes_beyond_the_model_get_a_400_naming_the_limit(client, size):
    with pytest.raises(openai.BadRequestError) as err:  # 400
        client.images.generate(model="bagel", prompt="x", size=size)
    assert err.value.body["param"] == "size" and "largest side is 128" in err.value.body["message"]  # the tiny model's


def test_edit_with_two_images_and_auto_size(client, local, pictures):
    first, second = pictures
    # README: edits with several images
    edited = client.images.edit(model="bagel", image=[("a.png", png_bytes(first)), ("b.png", png_bytes(second))],
                                prompt="combine them", size="auto", extra_body={"seed": 2, "num_inference_steps": 3})
    want = local.run(GenerationRequest("img2img", "combine them", image=second, context=(first,), seed=2,
                                       num_inference_steps=3))
    got = b64_image(edited.data[0].b64_json).convert("RGB")
    assert got.size == want.image.size  # the last input's VAE-resized size
    assert np.array_equal(np.asarray(got), np.asarray(want.image))


def test_edit_mask_is_refused_with_the_reason(client, picture):
    with pytest.raises(openai.BadRequestError) as err:
        client.images.edit(model="bagel", image=("a.png", png_bytes(picture)), mask=("m.png", png_bytes(picture)),
                           prompt="x")
    assert err.value.body["param"] == "mask" and "no inpainting" in err.value.body["message"]


def test_models_retrieve(client):
    # README: models
    assert client.models.retrieve("bagel").id == "bagel"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4o")
    assert err.value.body["param"] == "model"


def test_rejected_requests_are_counted_by_status(client, serve_app, ray_session):
    import time

    import requests

    from tests.serve.test_metrics import scrape

    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="bagel", messages=[{"role": "user", "content": "hi"}], max_tokens=0)
    assert requests.get(serve_app.url + "/v1/nowhere", timeout=30).status_code == 404
    wanted = ('status="422"', 'status="404"')
    deadline = time.monotonic() + 60
    while True:
        lines = [l for l in scrape(ray_session).splitlines()
                 if l.startswith("ray_bagel_requests_total") and 'modality="none"' in l]
        missing = [w for w in wanted if not any(w in l for l in lines)]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not missing, lines


def test_streamed_partial_images(client, local, pictures):
    # README: streamed partial images
    stream = client.images.generate(model="bagel", prompt="a lighthouse", size="32x32", stream=True, partial_images=3,
                                    extra_body={"seed": 5, "num_inference_steps": 9})
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:3]] == [0, 1, 2]

    records = []
    want = local.run(GenerationRequest("text2img", "a lighthouse", height=32, width=32, seed=5, num_inference_steps=9),
                     on_step=records.append)
    prepared = local.prepare_image(GenerationRequest("text2img", "a lighthouse", height=32, width=32, seed=5))
    steps = sorted(preview_steps(len(records), 3))
    assert len(steps) == 3 and steps[-1] < len(records) - 1
    for event, step in zip(events, steps):  # each: the decoded x0 estimate after its step
        expected = np.asarray(local.preview(prepared, records[step]))
        assert np.array_equal(np.asarray(b64_image(event.b64_json).convert("RGB")), expected), step
    final = np.asarray(b64_image(events[-1].b64_json).convert("RGB"))
    assert np.array_equal(final, np.asarray(want.image))
    assert not np.array_equal(np.asarray(b64_image(events[0].b64_json).convert("RGB")), final)

    first, _ = pictures
    edit_events = list(client.images.edit(model="bagel", image=("a.png", png_bytes(first)), prompt="night", stream=True,
                                          partial_images=1, extra_body={"num_inference_steps": 4}))
    assert [e.type for e in edit_events] == ["image_edit.partial_image", "image_edit.completed"]
    assert b64_image(edit_events[-1].b64_json).size == b64_image(edit_events[0].b64_json).size


def test_a_stream_with_no_partial_images_is_the_completed_event_alone(client, local):
    events = list(client.images.generate(model="bagel", prompt="a lighthouse", size="32x32", stream=True, partial_images=0,
                                         extra_body={"seed": 5, "num_inference_steps": 3}))
    assert [e.type for e in events] == ["image_generation.completed"]
    want = local.run(GenerationRequest("text2img", "a lighthouse", height=32, width=32, seed=5, num_inference_steps=3))
    assert np.array_equal(np.asarray(b64_image(events[0].b64_json).convert("RGB")), np.asarray(want.image))


def dit_log_count(app_name: str, text: str) -> int:
    from pathlib import Path

    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    return sum(f.read_text(errors="replace").count(text) for f in logs.glob(f"replica_{app_name}_DiT_*.log"))


def test_a_client_leaving_a_partial_image_stream_stops_the_work(serve_app, picture):
    import time

    import requests

    before = dit_log_count(serve_app.name, "render: cancelled")
    form = {"prompt": "slowly", "stream": "true", "partial_images": "3", "num_inference_steps": "500", "seed": "1"}
    with requests.post(serve_app.url + "/v1/images/edits", files={"image": ("a.png", png_bytes(picture), "image/png")},
                       data=form, stream=True, timeout=120) as resp:
        assert resp.status_code == 200  # the first step ran; now hang up long before step 500
    deadline = time.monotonic() + 30
    while dit_log_count(serve_app.name, "render: cancelled") == before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert dit_log_count(serve_app.name, "render: cancelled") > before, "the DiT went on denoising for a gone client"


def test_chat_image_stream_carries_the_previews(client, local):
    stream = client.chat.completions.create(
        model="bagel", messages=[{"role": "user", "content": "a red fox"}], stream=True,
        extra_body={"modalities": ["image"], "size": "32x32", "num_inference_steps": 5, "seed": 8, "partial_images": 2},
    )
    progress = [chunk.model_extra["progress"] for chunk in stream if (chunk.model_extra or {}).get("progress")]
    previews = [p for p in progress if "partial_image" in p]
    assert [p["partial_image_index"] for p in previews] == [0, 1]
    records = []
    local.run(GenerationRequest("text2img", "a red fox", height=32, width=32, seed=8, num_inference_steps=5),
              on_step=records.append)
    prepared = local.prepare_image(GenerationRequest("text2img", "a red fox", height=32, width=32, seed=8))
    for preview, step in zip(previews, sorted(preview_steps(len(records), 2))):
        assert preview["step"] == step + 1
        got = b64_image(preview["partial_image"].split(",", 1)[1]).convert("RGB")
        assert np.array_equal(np.asarray(got), np.asarray(local.preview(prepared, records[step])))


def test_the_readme_snippets_are_this_module_s_code():
    """README's "Use it from the OpenAI SDK" says its snippets are these tests' code: each of its
    statements (but the import and the client's construction, which the `client` fixture does
    with retries off) is a statement or expression of this module, as Python parses both."""
    import ast
    from pathlib import Path

    from tests.conftest import REPO_ROOT

    section = (REPO_ROOT / "README.md").read_text().split("## Use it from the OpenAI SDK", 1)[1].split("\n## ", 1)[0]
    snippets = ast.parse(section.split("```python\n", 1)[1].split("```", 1)[0]).body
    ours = {ast.unparse(node) for node in ast.walk(ast.parse(Path(__file__).read_text()))
            if isinstance(node, (ast.stmt, ast.expr))}
    setup = [s for s in snippets if isinstance(s, ast.ImportFrom) or ast.unparse(s).startswith("client = OpenAI(")]
    assert len(setup) == 2 and len(snippets) > 10, [ast.unparse(s) for s in setup]
    missing = [ast.unparse(s) for s in snippets if s not in setup and ast.unparse(s) not in ours]
    assert not missing, missing
