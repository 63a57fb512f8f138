"""The ingress: an OpenAI-compatible HTTP API over the Thinker and DiT deployments.

Per modality: text2text and img2text run on the Thinker; text2img is Thinker prefill (and
think decoding) -> KV handoff -> DiT; img2img runs on the DiT alone or, when the config says
so, like text2img. The driver passes the Thinker's DeploymentResponse straight into the DiT
call, so KV contexts go from replica to replica through the object store, never through
the driver. `generate` is also what Python clients call through a Serve handle.
"""


import asyncio
import json
import logging
import secrets
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from bagel_ray.engine.request import DEFAULT_SIZE, GenerationRequest, GenerationResult
from bagel_ray.serve import metrics
from bagel_ray.serve.config import AppConfig
from bagel_ray.serve.schemas import (
    BagelKnobs,
    ChatCompletionRequest,
    ImageEditRequest,
    ImageGenerationRequest,
    InputError,
    decode_data_url,
    decode_image,
    parse_size,
    png_base64,
)

log = logging.getLogger("bagel_ray.serve")
api = FastAPI(title="bagel-ray", description="BAGEL-7B-MoT on Ray Serve (OpenAI-compatible)")
RETRYABLE = (ActorDiedError, ActorUnavailableError)


def error_body(message: str, kind: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def error_response(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(error_body(message, kind, param), status_code=status, headers=headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"] if p != "body")
    return error_response(422, f"{param}: {first['msg']}", param)


def sse(data: Any) -> str:
    return f"data: {json.dumps(data)}\n\n"


@serve.deployment(name="Driver")
@serve.ingress(api)
class Driver:
    def __init__(self, thinker: DeploymentHandle, dit: DeploymentHandle, app_config: dict) -> None:
        self.thinker = thinker
        self.dit = dit
        self.config = AppConfig.model_validate(app_config)
        self._info = None

    async def model_info(self):
        if self._info is None:
            self._info = await self.thinker.model_info.remote()
        return self._info

    async def app_config(self) -> dict:
        """The validated args this app runs with (a job reusing the app checks its flags against them)."""
        return self.config.model_dump(mode="json")

    # -- composition (also the Python handle API) --------------------------------------

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        """One request through the stage graph, with the deadline and one retry on a replica
        that died mid-request (generation is seeded, so the retry gives the same output)."""
        t0 = time.perf_counter()
        status = "ok"
        try:
            for attempt in (1, 2):
                try:
                    return await asyncio.wait_for(self._compose(req), self.config.request_timeout_s)
                except RETRYABLE:
                    if attempt == 2:
                        raise
                    log.warning("a replica died during a %s request; retrying once", req.modality)
        except BaseException as exc:
            status = type(exc).__name__
            raise
        finally:
            metrics.count_request(req.modality, status, time.perf_counter() - t0)
        raise AssertionError("unreachable")

    async def _compose(self, req: GenerationRequest) -> GenerationResult:
        if not req.outputs_image:
            return await self.thinker.understand.remote(req)
        if req.modality == "img2img" and self.config.edit_contexts_on == "dit":
            return await self.dit.generate.remote(req)
        return await self.dit.render.remote(req, self.thinker.prepare_image.remote(req))

    async def stream(self, req: GenerationRequest) -> AsyncIterator[str | dict | GenerationResult]:
        """Text deltas (text modalities) or progress events (image modalities), then the result."""
        if not req.outputs_image:
            gen = self.thinker.options(stream=True).understand_stream.remote(req)
        elif req.modality == "img2img" and self.config.edit_contexts_on == "dit":
            gen = self.dit.options(stream=True).render_stream.remote(req, None)
        else:
            gen = self.dit.options(stream=True).render_stream.remote(req, self.thinker.prepare_image.remote(req))
        async for item in gen:
            yield item

    # -- HTTP ---------------------------------------------------------------------------

    async def _guard(self, request: Request, body_model, handler):
        """Body-size limit, validation and error mapping shared by the POST routes."""
        length = request.headers.get("content-length")
        if length is not None and int(length) > self.config.max_request_bytes:
            return error_response(413, f"request body of {length} bytes exceeds {self.config.max_request_bytes}")
        try:
            if body_model is not None:
                raw = await request.body()
                if len(raw) > self.config.max_request_bytes:
                    return error_response(413, f"request body exceeds {self.config.max_request_bytes} bytes")
                try:
                    payload = json.loads(raw)
                except json.JSONDecodeError as exc:
                    return error_response(400, f"body is not valid JSON: {exc}")
                body = body_model.model_validate(payload)
            else:
                body = None
            if body is not None and body.model not in (None, self.config.model_name):
                return error_response(404, f"model {body.model!r} is not served here (this is {self.config.model_name!r})", "model")
            return await handler(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"])
            return error_response(422, f"{param}: {first['msg']}", param)
        except InputError as exc:
            return error_response(exc.status, str(exc), exc.param)
        except BackPressureError:
            return error_response(503, "the service is at capacity; retry later", headers={"Retry-After": "5"})
        except asyncio.TimeoutError:
            return error_response(504, f"the request did not finish within {self.config.request_timeout_s}s")
        except ValueError as exc:
            return error_response(422, str(exc))
        except RETRYABLE as exc:
            return error_response(503, f"a replica failed twice: {exc}", headers={"Retry-After": "5"})

    def _seed(self, knobs: BagelKnobs) -> int:
        return knobs.seed if knobs.seed is not None else secrets.randbelow(2**31)

    async def _size(self, size: str | None) -> tuple[int | None, int | None]:
        info = await self.model_info()
        return parse_size(size, info.max_image_side, info.latent_downsample)

    async def _default_size(self) -> int:
        return min(DEFAULT_SIZE, (await self.model_info()).max_image_side)

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.config.model_name, "object": "model", "owned_by": "bagel-ray", "created": 0}]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._guard(request, ChatCompletionRequest, self._chat)

    async def _chat(self, body: ChatCompletionRequest):
        prompt, image_url = body.prompt_and_image()
        image = decode_data_url(image_url, "messages") if image_url else None
        wants_image = body.modalities == ["image"]
        if wants_image:
            modality = "img2img" if image is not None else "text2img"
        else:
            modality = "img2text" if image is not None else "text2text"
            if body.size is not None:
                raise InputError("size applies to image output only", "size", 422)
        if modality == "img2img" and body.size is not None:
            raise InputError("img2img generates at the input image's size; size cannot be set", "size", 422)
        height, width = await self._size(body.size)
        if modality == "text2img" and height is None:
            height = width = await self._default_size()
        req = body.request(modality, prompt, image, self._seed(body), height, width)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return StreamingResponse(self._chat_stream(req, rid, created), media_type="text/event-stream")
        result = await self.generate(req)
        return {
            "id": rid, "object": "chat.completion", "created": created, "model": self.config.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": self._content(result)},
                         "finish_reason": result.finish_reason or "stop"}],
            "usage": {"completion_tokens": len(result.token_ids or [])},
            "seed": req.seed,
        }

    def _content(self, result: GenerationResult) -> str | list[dict]:
        if result.image is None:
            return result.text
        parts = [] if result.think_text is None else [{"type": "text", "text": result.think_text}]
        parts.append({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png_base64(result.image)}"}})
        return parts

    async def _chat_stream(self, req: GenerationRequest, rid: str, created: int) -> AsyncIterator[str]:
        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.config.model_name,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})

        t0, status = time.perf_counter(), "ok"
        yield chunk({"role": "assistant"})
        try:
            async for item in self.stream(req):
                if isinstance(item, str):
                    yield chunk({"content": item})
                elif isinstance(item, dict):
                    yield chunk({}, progress=item)
                else:
                    final = {} if item.image is None else {"content": self._content(item)}
                    yield chunk(final, item.finish_reason or "stop", seed=req.seed)
        except Exception as exc:  # the stream has started: report in-band
            status = type(exc).__name__
            log.exception("stream failed")
            yield sse(error_body(str(exc), "server_error"))
        finally:
            metrics.count_request(req.modality, status, time.perf_counter() - t0)
        yield "data: [DONE]\n\n"

    @api.post("/v1/images/generations")
    async def image_generations(self, request: Request):
        return await self._guard(request, ImageGenerationRequest, self._images)

    async def _images(self, body: ImageGenerationRequest):
        height, width = await self._size(body.size)
        if height is None:
            height = width = await self._default_size()
        seed = self._seed(body)
        reqs = [body.request("text2img", body.prompt, None, seed + i, height, width) for i in range(body.n)]
        return self._image_list(await asyncio.gather(*(self.generate(r) for r in reqs)))

    def _image_list(self, results: list[GenerationResult]) -> dict:
        data = []
        for r in results:
            item = {"b64_json": png_base64(r.image), "seed": r.seed}
            if r.think_text is not None:
                item["revised_prompt"] = r.think_text
            data.append(item)
        return {"created": int(time.time()), "data": data}

    @api.post("/v1/images/edits")
    async def image_edits(self, request: Request):
        async def handler(_):
            try:
                form = await request.form()
            except Exception as exc:  # malformed multipart
                raise InputError(f"expected a multipart/form-data body: {exc}") from exc
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise InputError("an image file is required", "image")
            fields = {k: v for k, v in form.multi_items() if k != "image"}
            if "cfg_interval" in fields:
                fields["cfg_interval"] = json.loads(fields["cfg_interval"]) if fields["cfg_interval"].startswith("[") else fields["cfg_interval"].split(",")
            body = ImageEditRequest.model_validate(fields)
            if body.model not in (None, self.config.model_name):
                raise InputError(f"model {body.model!r} is not served here", "model", 404)
            image = decode_image(await upload.read(), "image")
            seed = self._seed(body)
            reqs = [body.request("img2img", body.prompt, image, seed + i) for i in range(body.n)]
            return self._image_list(await asyncio.gather(*(self.generate(r) for r in reqs)))

        return await self._guard(request, None, handler)
