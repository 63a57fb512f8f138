"""Python client of a running bagel-ray app, over a Serve handle or over HTTP.

Both paths take the knobs of `bagel_ray.knobs` as keywords, named as in the HTTP API
(`num_inference_steps`, `seed`, `cfg_text_scale`, ..., `taylorseer`), and check them here with
the HTTP API's own model before anything is sent, so a bad value fails the same way on either
path. They return text or PIL images; image results carry the seed used, and the think text if
any, in `image.info`.
"""

from __future__ import annotations

import base64
import io
import secrets
from typing import Any

import requests
from PIL import Image

from bagel_ray.routes import modality_for
from bagel_ray.serve.schemas import BagelKnobs, parse_size, png_base64


class ClientError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


def _form_text(value: Any) -> str:
    """A knob as a form field of /v1/images/edits (read back by `ImageEditRequest.from_form`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


class Client:
    def __init__(self, handle: Any = None, url: str | None = None, api_key: str | None = None, timeout_s: float = 600.0) -> None:
        if (handle is None) == (url is None):
            raise ValueError("give exactly one of handle (a Serve app handle) or url (http://host:port)")
        self.handle = handle
        self.url = None if url is None else url.rstrip("/")
        self.timeout_s = timeout_s
        self.headers = {} if api_key is None else {"Authorization": f"Bearer {api_key}"}

    @classmethod
    def from_app(cls, app_name: str = "bagel") -> "Client":
        """A client over the handle of a Serve app running in the connected Ray cluster."""
        from ray import serve

        return cls(handle=serve.get_app_handle(app_name))

    # -- public API ---------------------------------------------------------------------

    def chat(self, prompt: str, image: Image.Image | None = None, **knobs: Any) -> str:
        """Text answer to a prompt, about an image if one is given (text2text / img2text)."""
        parsed = BagelKnobs.model_validate(knobs)
        if self.handle is not None:
            return self._via_handle(modality_for(image is not None, False), prompt, image, None, parsed).text
        content: Any = prompt
        if image is not None:
            content = [{"type": "text", "text": prompt},
                       {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png_base64(image)}"}}]
        body = self._post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}], **knobs})
        return body["choices"][0]["message"]["content"]

    def generate_image(self, prompt: str, size: str | None = None, **knobs: Any) -> Image.Image:
        """text2img; `size` is 'WxH' (default: 1024x1024, or the model's largest)."""
        parsed = BagelKnobs.model_validate(knobs)
        if self.handle is not None:
            return self._image(self._via_handle(modality_for(False, True), prompt, None, size, parsed))
        body = self._post("/v1/images/generations", json={"prompt": prompt, **({"size": size} if size else {}), **knobs})
        return self._decoded(body["data"][0])

    def edit_image(self, image: Image.Image, prompt: str, **knobs: Any) -> Image.Image:
        """img2img at the input's (VAE-resized) size."""
        parsed = BagelKnobs.model_validate(knobs)
        if self.handle is not None:
            return self._image(self._via_handle(modality_for(True, True), prompt, image, None, parsed))
        fields = {k: _form_text(v) for k, v in knobs.items()}
        png = base64.b64decode(png_base64(image))
        body = self._post("/v1/images/edits", files={"image": ("image.png", png, "image/png")}, data={"prompt": prompt, **fields})
        return self._decoded(body["data"][0])

    # -- plumbing -----------------------------------------------------------------------

    def _via_handle(self, modality: str, prompt: str, image: Image.Image | None, size: str | None, parsed: BagelKnobs):
        height, width = parse_size(size, 1 << 30, 16)
        seed = parsed.seed if parsed.seed is not None else secrets.randbelow(2**31)
        req = parsed.request(modality, prompt, image, seed, height, width)
        return self.handle.generate.remote(req).result(timeout_s=self.timeout_s)

    @staticmethod
    def _image(result) -> Image.Image:
        image = result.image
        image.info.update(seed=result.seed, think_text=result.think_text)
        return image

    @staticmethod
    def _decoded(item: dict) -> Image.Image:
        image = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
        image.load()
        image.info.update(seed=item.get("seed"), think_text=item.get("revised_prompt"))
        return image

    def _post(self, path: str, **kwargs: Any) -> dict:
        resp = requests.post(self.url + path, headers=self.headers, timeout=self.timeout_s, **kwargs)
        if resp.status_code != 200:
            try:
                message = resp.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = resp.text
            raise ClientError(resp.status_code, message)
        return resp.json()
