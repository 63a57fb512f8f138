"""Input limits at the ingress, over real HTTP on the session's tiny app: every class of bad
input gets its status and a JSON error naming the field, and the next good request still
succeeds. Odd but valid images are served, not crashed on."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import requests
from PIL import Image

from bagel_ray.serve.schemas import MAX_IMAGE_BYTES

CHAT = "/v1/chat/completions"
IMAGES = "/v1/images/generations"
EDITS = "/v1/images/edits"
GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "seed": 1}


def post(app, path: str, **kwargs) -> requests.Response:
    return requests.post(app.url + path, timeout=120, **kwargs)


def encoded(image: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def chat_with_image(data: bytes | str, mime: str = "image/png", **extra) -> dict:
    url = data if isinstance(data, str) else f"data:{mime};base64,{base64.b64encode(data).decode()}"
    content = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


def assert_error(resp: requests.Response, status: int, param: str | None) -> None:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["param"] == param, error
    assert error["message"] and error["type"] == ("invalid_request_error" if status < 500 else "server_error")


def assert_still_serves(app) -> None:
    ok = post(app, CHAT, json=GOOD_CHAT)
    assert ok.status_code == 200, ok.text


@pytest.fixture(scope="module")
def png() -> bytes:
    rng = np.random.default_rng(1)
    return encoded(Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)), "PNG")


def huge_header_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels; its data is not even there."""
    real = encoded(Image.new("L", (1, 1)), "PNG")
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return real[:8] + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk)) + real[33:]


BAD_JSON = [
    # (path, body, status, param)
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.invalid/a.png"}}]}]}, 400, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}, 400, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/hostname"}}]}]}, 400, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}]}]}, 400, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}]}]}, 400, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "temperature": -0.1}, 422, "temperature"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "do_sample": True}, 422, None),  # 0 is greedy
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, 422, "top_p"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 40000}, 422, "max_tokens"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4095}, 422, "max_tokens"),  # max_model_len 4096
    (CHAT, {"messages": [{"role": "user", "content": "x" * 5000}], "max_tokens": 1}, 422, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": "\ud800 lone surrogate"}]}, 422, "messages.0.content"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "modalities": ["image"], "think": True, "max_think_tokens": 4090}, 422, "max_think_tokens"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "size": "32x32"}, 422, "size"),
    (CHAT, [1, 2], 422, None),
    (IMAGES, {"prompt": "x", "size": "48x40"}, 422, "size"),
    (IMAGES, {"prompt": "x", "size": "144x144"}, 400, "size"),  # past the tiny model's largest side (128)
    (IMAGES, {"prompt": "x", "size": "32x4096"}, 400, "size"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "modalities": ["image"], "size": "256x256"}, 400, "size"),
    (IMAGES, {"prompt": "x", "size": "0x0"}, 422, "size"),
    (IMAGES, {"prompt": "x", "num_inference_steps": 501}, 422, "num_inference_steps"),
    (IMAGES, {"prompt": "x", "cfg_text_scale": -1}, 422, "cfg_text_scale"),
    (IMAGES, {"prompt": "x", "cfg_img_scale": 51}, 422, "cfg_img_scale"),
    (IMAGES, {"prompt": "x", "timestep_shift": 0}, 422, "timestep_shift"),
    (IMAGES, {"prompt": "x", "cfg_renorm_min": 2}, 422, "cfg_renorm_min"),
    (IMAGES, {"prompt": "x", "seed": -1}, 422, "seed"),
    (IMAGES, {"prompt": "x", "n": 9}, 422, "n"),
    (IMAGES, {"prompt": "y" * 5000}, 422, "prompt"),
    # strict types (issue 25 item 7): no coercion of booleans, strings or floats into integers
    (IMAGES, {"prompt": "x", "num_inference_steps": True}, 422, "num_inference_steps"),
    (IMAGES, {"prompt": "x", "num_inference_steps": "2"}, 422, "num_inference_steps"),
    (IMAGES, {"prompt": "x", "num_inference_steps": 2.0}, 422, "num_inference_steps"),
    (IMAGES, {"prompt": "x", "n": True}, 422, "n"),
    (IMAGES, {"prompt": "x", "cfg_text_scale": "4"}, 422, "cfg_text_scale"),
    (IMAGES, {"prompt": "x", "cfg_interval": [0, True]}, 422, "cfg_interval.1"),
    (IMAGES, {"prompt": "x", "taylorseer": "yes"}, 422, "taylorseer"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "2"}, 422, "max_tokens"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "think": 1}, 422, "think"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "seed": 1.0}, 422, "seed"),
    # seed + i of n images must stay a seed a client can send back (issue 25 item 8)
    (IMAGES, {"prompt": "x", "seed": 2**63 - 1, "n": 2}, 422, "n"),
]


@pytest.mark.parametrize("path,body,status,param", BAD_JSON)
def test_bad_json_input(serve_app, path, body, status, param):
    assert_error(post(serve_app, path, json=body), status, param)
    assert_still_serves(serve_app)


def test_bad_images_in_chat(serve_app, png):
    tiff = encoded(Image.new("RGB", (16, 16)), "TIFF")
    cases = [
        (chat_with_image(tiff, "image/tiff"), 400),                  # a format that is not accepted
        (chat_with_image(png[: len(png) // 2]), 400),                # truncated
        (chat_with_image(b"\x00" * 64), 400),                        # not an image at all
        (chat_with_image(huge_header_png(5000, 5000)), 413),         # too many pixels, refused from the header
        (chat_with_image(huge_header_png(1 << 20, 1 << 20)), 413),   # a decompression bomb's header
        (chat_with_image("data:image/png;base64," + "A" * (MAX_IMAGE_BYTES * 4 // 3 + 8)), 413),  # too many bytes
    ]
    for body, status in cases:
        assert_error(post(serve_app, CHAT, json=body), status, "messages")
        assert_still_serves(serve_app)


def test_bad_uploads(serve_app, png):
    cases = [
        (dict(files={"image": ("x.tiff", encoded(Image.new("RGB", (16, 16)), "TIFF"), "image/tiff")}, data={"prompt": "x"}), 400, "image"),
        (dict(files={"image": ("x.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * (MAX_IMAGE_BYTES + 1), "image/png")}, data={"prompt": "x"}), 413, "image"),
        (dict(files=[("image", (f"{i}.png", png, "image/png")) for i in range(5)], data={"prompt": "x"}), 400, "image"),  # at most 4
        (dict(files={"image": ("a.png", png, "image/png"), "cfg_interval": ("c.txt", b"0,1", "text/plain")}, data={"prompt": "x"}), 422, "cfg_interval"),
        (dict(files={"image": ("a.png", png, "image/png")}, data={"prompt": "x", "cfg_interval": "[0.1,"}), 422, "cfg_interval"),
        (dict(files={"image": ("a.png", png, "image/png")}, data={"prompt": "x", "num_inference_steps": "many"}), 422, "num_inference_steps"),
        (dict(files={"image": ("a.png", png, "image/png")}, data={"prompt": "x", "size": "32x32"}), 422, "size"),
        (dict(files={"image": ("a.png", png, "image/png")}, data={"prompt": "x", "num_inference_steps": "2.5"}), 422, "num_inference_steps"),
        (dict(files={"image": ("a.png", png, "image/png")}, data={"prompt": "x", "think": "maybe"}), 422, "think"),
        (dict(files={"image": ("a.png", png, "image/png")}, data={"prompt": "x", "cfg_interval": "0.9,0.1"}), 422, "cfg_interval"),
        (dict(files={"image": ("a.png", png, "image/png")}, data={"prompt": "x", "cfg_interval": "[" * 1000}), 422, "cfg_interval"),
        (dict(files={"image": ("a.png", png, "image/png")}, data={"prompt": "x", "seed": str(2**63 - 1), "n": "2"}), 422, "n"),
        (dict(json={"prompt": "x"}), 400, "image"),  # not multipart
    ]
    for kwargs, status, param in cases:
        assert_error(post(serve_app, EDITS, **kwargs), status, param)
        assert_still_serves(serve_app)


def test_seeds_at_the_top_of_the_range_are_returned_as_sent(serve_app):
    body = {"prompt": "x", "size": "16x16", "num_inference_steps": 2, "seed": 2**63 - 2, "n": 2}
    resp = post(serve_app, IMAGES, json=body)
    assert resp.status_code == 200, resp.text
    seeds = [item["seed"] for item in resp.json()["data"]]
    assert seeds == [2**63 - 2, 2**63 - 1]
    again = post(serve_app, IMAGES, json={**body, "seed": seeds[-1], "n": 1})  # a returned seed can be sent back
    assert again.status_code == 200, again.text


def test_body_size_limit(serve_app):
    limit = 32 * 1024 * 1024  # tiny.yaml keeps the default max_request_bytes
    too_big = b"x" * (limit + 1)
    assert_error(post(serve_app, CHAT, data=too_big, headers={"content-type": "application/json"}), 413, None)

    def chunked():  # no Content-Length: refused while it streams in
        for _ in range(limit // (1 << 20) + 2):
            yield b"x" * (1 << 20)

    assert_error(post(serve_app, IMAGES, data=chunked(), headers={"content-type": "application/json"}), 413, None)
    assert_error(post(serve_app, CHAT, data=b"{not json", headers={"content-type": "application/json"}), 400, None)
    assert_still_serves(serve_app)


@pytest.mark.parametrize("mode,fmt", [("P", "GIF"), ("LA", "PNG"), ("I;16", "PNG"), ("CMYK", "JPEG"), ("1", "BMP"), ("RGBA", "WEBP")])
def test_odd_but_valid_images_are_served(serve_app, mode, fmt):
    image = Image.new(mode, (20, 12))
    resp = post(serve_app, CHAT, json=chat_with_image(encoded(image, fmt), f"image/{fmt.lower()}"))
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("size", [(1, 1), (1, 300), (300, 2)])
def test_extreme_image_shapes_are_served(serve_app, size):
    png = encoded(Image.new("RGB", size, (200, 10, 10)), "PNG")
    assert post(serve_app, CHAT, json=chat_with_image(png)).status_code == 200
    resp = post(serve_app, EDITS, files={"image": ("a.png", png, "image/png")}, data={"prompt": "x", "num_inference_steps": "2"})
    assert resp.status_code == 200, resp.text
