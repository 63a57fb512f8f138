"""The ingress: an OpenAI-compatible HTTP API over the Thinker and DiT deployments.

Per modality: text2text and img2text run on the Thinker; text2img is Thinker prefill (and
think decoding) -> KV handoff -> DiT; img2img runs on the DiT alone or, when the config says
so, like text2img. The driver passes the Thinker's DeploymentResponse straight into the DiT
call, so KV contexts go from replica to replica through the object store, never through
the driver. `generate` is also what Python clients call through a Serve handle.

What the service promises under bad input, overload, deadlines, replica failure and
out-of-memory is decided here (`failure` maps each error to its status) and listed in the
README ("What the service promises").
"""


import asyncio
import json
import logging
import os
import secrets
import time
import uuid
from contextlib import contextmanager
from typing import Any, AsyncIterator, Awaitable, Iterable, Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
import ray
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from bagel_ray.engine.request import GenerationRequest, GenerationResult
from bagel_ray.knobs import DEFAULT_SIZE
from bagel_ray.routes import DIT, THINKER, modality_for, route
from bagel_ray.serve import metrics
from bagel_ray.serve.access import AccessControl
from bagel_ray.serve.bodies import parse_body_off_loop
from bagel_ray.serve.config import AppConfig
from bagel_ray.serve.errors import InputError, Overloaded, error_body, error_response, failure, replica_died, validation_param
from bagel_ray.serve.schemas import (
    ALLOWED_IMAGE_FORMATS,
    BagelKnobs,
    ChatCompletionRequest,
    ErrorResponse,
    ImageEditRequest,
    ImageGenerationRequest,
    ImagesRequest,
    MAX_INPUT_IMAGES,
    decode_data_url,
    decode_image,
    parse_size,
    png_base64,
)
from bagel_ray.serve.replica import ModelInfo, logs_into_serve

log = logging.getLogger("bagel_ray.serve")
api = FastAPI(title="bagel-ray", description="BAGEL-7B-MoT on Ray Serve (OpenAI-compatible)", version="0.1.0")


# -- admission ---------------------------------------------------------------------------


class Gate:
    """Requests this ingress replica has in one stage at once (running or queued there),
    refused past `limit` at once. Text requests count against the Thinker, image requests
    against the DiT. It is exact: the driver's event loop is the only place that counts."""

    def __init__(self, stage: str, limit: int | None) -> None:
        self.stage = stage
        self.limit = limit
        self.in_flight = 0

    @contextmanager
    def slot(self) -> Iterator[None]:
        if self.limit is not None and self.in_flight >= self.limit:
            raise Overloaded(f"the {self.stage} stage is at its limit of {self.limit} requests in flight")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    param, message = validation_param(exc)
    return error_response(422, message, param)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes (404) and wrong methods (405) in the API's error shape, not FastAPI's
    `{"detail": ...}`."""
    message = f"{request.method} {request.url.path}: {exc.detail}"
    count_rejected(exc.status_code)
    return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))


def count_rejected(status: int, exc: BaseException | None = None) -> None:
    """A request answered with an error before or without a stage's count of it
    (`Driver._generate` counts those that reach the stages): modality "none", status the HTTP
    status."""
    if exc is None or not getattr(exc, "_bagel_counted", False):
        metrics.count_request("none", str(status), 0.0)


def _mark_counted(exc: BaseException) -> None:
    try:
        exc._bagel_counted = True  # noqa: SLF001  (read by count_rejected)
    except AttributeError:  # an exception type without a __dict__: counted twice at worst
        pass


def sse(data: Any) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, refused (413) as soon as it passes `limit` bytes, whether or not it
    declared its length, and (408) when it has not all arrived within `timeout_s`: a client
    that trickles its upload would otherwise hold its ingress slot for as long as it likes.
    Starlette's form and JSON parsers then read it from the cache."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise InputError(f"invalid Content-Length header {length!r}")
        if int(length) > limit:
            raise InputError(f"request body of {length} bytes exceeds the limit of {limit}", None, 413)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise InputError(f"request body exceeds the limit of {limit} bytes", None, 413)
                chunks.append(chunk)
    except TimeoutError:
        raise InputError(f"the request body did not arrive within body_timeout_s={timeout_s}s ({size} bytes came)",
                         None, 408) from None
    body = b"".join(chunks)
    request._body = body  # noqa: SLF001  (Starlette's body cache, read by request.form())
    return body


async def all_or_nothing(coros: Iterable[Awaitable[Any]]) -> list[Any]:
    """Run concurrently; the first failure cancels the others and is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        pending = [t for t in tasks if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


# -- OpenAPI: the routes read raw requests, so their bodies are declared here ---------------

_REF = "#/components/schemas/{model}"
_EDIT_FORM = "ImageEditForm"
_ERRORS = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "Malformed body or image, or a size beyond the model's limit", 401: "Missing or invalid API key", 404: "Unknown model",
        408: "Body not all received within body_timeout_s", 413: "Body or image over the limits",
        422: "A field out of range or unknown, or a prompt too long",
        503: "At capacity or a replica failed (see Retry-After)", 504: "Deadline passed",
        507: "Out of accelerator memory",
    }.items()
}


def _body(schema_name: str, media_type: str = "application/json") -> dict:
    return {"requestBody": {"required": True, "content": {media_type: {"schema": {"$ref": _REF.format(model=schema_name)}}}}}


def _edit_form_schema() -> dict:
    """ImageEditRequest's fields as multipart form fields, plus the image file."""
    schema = ImageEditRequest.model_json_schema(ref_template=_REF)
    schema["title"] = _EDIT_FORM
    image = {"type": "string", "format": "binary", "description": f"the input image ({', '.join(ALLOWED_IMAGE_FORMATS)})"}
    schema["properties"] = {"image": image, **schema["properties"]}
    schema["required"] = ["image", *schema.get("required", [])]
    return schema


def openapi() -> dict:
    if api.openapi_schema is None:
        schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        bodies = {m.__name__: m.model_json_schema(ref_template=_REF) for m in (ChatCompletionRequest, ImageGenerationRequest)}
        bodies[_EDIT_FORM] = _edit_form_schema()
        for name, body in bodies.items():
            components.update(body.pop("$defs", {}))
            components[name] = body
        api.openapi_schema = schema
    return api.openapi_schema


api.openapi = openapi


@serve.deployment(name="Driver")
@serve.ingress(api)
class Driver:
    def __init__(self, thinker: DeploymentHandle, dit: DeploymentHandle, app_config: dict) -> None:
        logs_into_serve()
        self.thinker = thinker
        self.dit = dit
        self.config = AppConfig.model_validate(app_config)
        self.access = AccessControl.from_config(self.config.access, os.environ)
        self.gates = {"thinker": Gate("Thinker", self.config.thinker.admission_limit()),
                      "dit": Gate("DiT", self.config.dit.admission_limit())}
        # The API routes' own admission, below Serve's limit for this deployment: past it a
        # request gets the JSON 503 at once, and /health and /v1/models (not counted) still
        # find a slot (`IngressConfig.serve_options`).
        self.admission = Gate("ingress", self.config.ingress.max_ongoing_requests)
        self._model: asyncio.Future | None = None
        # Which cluster this app runs in: `serve run` without --address joins any cluster a
        # `ray start` left running on the machine, so the console says which one it joined.
        log.info("Driver ready; %s; Ray cluster at %s; %s", self.access, ray.get_runtime_context().gcs_address,
                 metrics.metrics_location(self.config.metrics_export_port))

    async def model_info(self) -> ModelInfo:
        """What requests are validated against, fetched from the Thinker once (one call in
        flight however many requests wait for it; a failed fetch is tried again later)."""
        if self._model is None:
            self._model = asyncio.ensure_future(self.thinker.model_info.remote())
        fetching = self._model
        try:
            return await asyncio.shield(fetching)
        except Exception:
            if self._model is fetching:
                self._model = None
            raise

    async def app_config(self) -> dict:
        """The validated args this app runs with (a job reusing the app checks its flags
        against them); they hold no API key, only where the keys are."""
        return self.config.public_dump()

    # -- composition (also the Python handle API) --------------------------------------

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        """One request through the stage graph, within the deadline, retried once on a
        replica that died mid-request (generation is seeded, so the retry gives the same
        output). A prompt too long for `max_model_len` raises `InputError` here (the cheap
        bound) or `PromptTooLong` from the stage that tokenizes it."""
        await self.bound_prompt(req.prompt, "prompt")
        return await self._generate(req)

    async def stream(self, req: GenerationRequest) -> AsyncIterator[str | dict | GenerationResult]:
        """Text deltas (text modalities) or progress events (image modalities), then the
        result. Not retried: a failure after the first item ends the stream with it."""
        await self.bound_prompt(req.prompt, "prompt")
        async for item in self._stream(req):
            yield item

    async def bound_prompt(self, prompt: str, param: str) -> None:
        """The cheap bound on a prompt's length, before anything tokenizes it: more characters
        than `max_model_len` tokens can hold (`ModelInfo.max_prompt_chars`) is refused at once.
        The exact count, with the tokens the request may decode, is made where the prompt is
        tokenized (the Thinker, or the DiT for edits it builds), which raises `PromptTooLong`."""
        info = await self.model_info()
        limit = info.max_prompt_chars(prompt.isascii())
        if len(prompt) > limit:
            raise InputError(f"the prompt is {len(prompt)} characters, more than max_model_len ({info.max_model_len}) "
                             f"tokens can hold (at most {limit})", param, 422)

    def _gate(self, req: GenerationRequest) -> Gate:
        return self.gates["dit" if req.outputs_image else "thinker"]

    async def _generate(self, req: GenerationRequest) -> GenerationResult:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.request_timeout_s  # one deadline for both attempts
        t0 = time.perf_counter()
        status = "ok"
        try:
            with self._gate(req).slot():
                return await self._attempts(req, loop, deadline)
        except BaseException as exc:
            status = type(exc).__name__
            _mark_counted(exc)
            raise
        finally:
            metrics.count_request(req.modality, status, time.perf_counter() - t0)

    async def _attempts(self, req: GenerationRequest, loop: asyncio.AbstractEventLoop, deadline: float) -> GenerationResult:
        for attempt in (1, 2):
            try:
                return await asyncio.wait_for(self._compose(req), max(0.0, deadline - loop.time()))
            except Exception as exc:
                if attempt == 2 or not replica_died(exc):
                    raise
                log.warning("a replica died during a %s request (%s); retrying once", req.modality, type(exc).__name__)
        raise AssertionError("unreachable")

    async def _compose(self, req: GenerationRequest) -> GenerationResult:
        """The stage calls of one attempt. If this attempt ends early (deadline, client gone,
        a failed stage) its calls are cancelled, and the replicas stop their work."""
        calls: list[DeploymentResponse] = []
        stages = route(req.modality).stages(self.config.edit_contexts_on)
        try:
            if stages == (THINKER,):
                calls.append(self.thinker.understand.remote(req))
            elif stages == (DIT,):
                calls.append(self.dit.generate.remote(req))
            else:  # (THINKER, DIT): the context's KV handed over
                calls.append(self.thinker.prepare_image.remote(req))
                calls.append(self.dit.render.remote(req.for_render(), calls[0]))
            return await calls[-1]
        except BaseException:
            for call in calls:
                call.cancel()
            raise

    async def _stream(self, req: GenerationRequest) -> AsyncIterator[str | dict | GenerationResult]:
        with self._gate(req).slot():
            async for item in self._stream_calls(req):
                yield item

    async def _stream_calls(self, req: GenerationRequest) -> AsyncIterator[str | dict | GenerationResult]:
        upstream: list[DeploymentResponse] = []
        stages = route(req.modality).stages(self.config.edit_contexts_on)
        if stages == (THINKER,):
            gen = self.thinker.options(stream=True).understand_stream.remote(req)
        elif stages == (DIT,):
            gen = self.dit.options(stream=True).render_stream.remote(req, None)
        else:
            upstream.append(self.thinker.prepare_image.remote(req))
            gen = self.dit.options(stream=True).render_stream.remote(req.for_render(), upstream[0])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.request_timeout_s
        finished = False
        try:
            while True:
                try:
                    item = await asyncio.wait_for(gen.__anext__(), max(0.0, deadline - loop.time()))
                except StopAsyncIteration:
                    finished = True
                    return
                yield item
        finally:
            if not finished:  # deadline, consumer gone or a failure: stop the replicas' work
                gen.cancel()
                for call in upstream:
                    call.cancel()

    # -- HTTP ---------------------------------------------------------------------------

    def _failure_response(self, exc: BaseException, prompt_param: str = "prompt") -> JSONResponse:
        status, message, param, headers = failure(exc, self.config.request_timeout_s, self.config.retry_after_s,
                                                  prompt_param)
        count_rejected(status, exc)
        return error_response(status, message, param, headers)

    def _denied(self, request: Request, route: str) -> JSONResponse | None:
        if self.access.allows(route, request.headers.get("authorization")):
            return None
        count_rejected(401)
        return error_response(401, "a valid API key is required (Authorization: Bearer KEY)",
                              headers={"WWW-Authenticate": "Bearer"}, code="invalid_api_key")

    async def _guard(self, request: Request, route: str, body_model, handler, prompt_param: str = "prompt"):
        """Access, body-size limit, validation and error mapping shared by the POST routes.
        The body is parsed and validated off the event loop (`bodies`)."""
        denied = self._denied(request, route)
        if denied is not None:
            return denied
        try:
            with self.admission.slot():
                raw = await read_body(request, self.config.max_request_bytes, self.config.body_timeout_s)
                body = None
                if body_model is not None:
                    body = await parse_body_off_loop(raw, body_model)
                    if body.model not in (None, self.config.model_name):
                        raise InputError(f"model {body.model!r} is not served here (this is {self.config.model_name!r})",
                                         "model", 404)
                return await handler(body)
        except Exception as exc:
            return self._failure_response(exc, prompt_param)

    def _seed(self, knobs: BagelKnobs) -> int:
        return knobs.seed if knobs.seed is not None else secrets.randbelow(2**31)

    async def _size(self, size: str | None) -> tuple[int | None, int | None]:
        info = await self.model_info()
        return parse_size(size, info.max_image_side, info.latent_downsample)

    async def _default_size(self) -> int:
        return min(DEFAULT_SIZE, (await self.model_info()).max_image_side)

    @api.get("/health", responses={401: _ERRORS[401]})
    async def health(self, request: Request):
        return self._denied(request, "/health") or {"status": "ok"}

    @api.get("/v1/models", responses={401: _ERRORS[401]})
    async def models(self, request: Request):
        return self._denied(request, "/v1/models") or {
            "object": "list",
            "data": [self._model_card()],
        }

    @api.get("/v1/models/{model_id}", responses={401: _ERRORS[401], 404: _ERRORS[404]})
    async def model(self, request: Request, model_id: str):
        denied = self._denied(request, "/v1/models")
        if denied is not None:
            return denied
        if model_id != self.config.model_name:
            count_rejected(404)
            return error_response(404, f"model {model_id!r} is not served here (this is {self.config.model_name!r})",
                                  "model", code="model_not_found")
        return self._model_card()

    def _model_card(self) -> dict:
        return {"id": self.config.model_name, "object": "model", "owned_by": "bagel-ray", "created": 0}

    @api.post("/v1/chat/completions", openapi_extra=_body("ChatCompletionRequest"), responses=_ERRORS)
    async def chat_completions(self, request: Request):
        return await self._guard(request, "/v1/chat/completions", ChatCompletionRequest, self._chat, "messages")

    async def _chat(self, body: ChatCompletionRequest):
        items, image_url, prompt = body.interleaved()
        await self.bound_prompt("\n".join([prompt, *(v for kind, v in items if kind == "text")]), "messages")

        def decode(url: str) -> Any:
            return decode_data_url(url, "messages", self.config.max_image_bytes, self.config.max_image_pixels)

        urls = [v for kind, v in items if kind == "image"] + ([image_url] if image_url else [])
        decoded = iter(await asyncio.to_thread(lambda: [decode(u) for u in urls]))
        context = tuple(next(decoded) if kind == "image" else v for kind, v in items)
        image = next(decoded) if image_url else None
        modality = modality_for(image_in=bool(urls), image_out=body.modalities == ["image"])
        path = route(modality)
        if not path.image_out and body.size is not None:
            raise InputError("size applies to image output only", "size", 422)
        if path.size_from_input and body.size is not None:
            raise InputError(f"{modality} generates at the input image's size; size cannot be set", "size", 422)
        if body.partial_images and not (path.image_out and body.stream):
            raise InputError("partial_images needs image output and stream=true", "partial_images", 422)
        height, width = await self._size(body.size)
        if path.image_out and not path.size_from_input and height is None:
            height = width = await self._default_size()
        req = body.request(modality, prompt, image, self._seed(body), height, width, context, body.partial_images or 0)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            # The first item is awaited before answering, so that a request refused at once
            # (capacity, a dead stage) still gets its status code instead of a 200 stream.
            items_out = self._stream(req)
            try:
                first = await anext(items_out)
            except BaseException:
                await items_out.aclose()
                raise
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(self._chat_stream(req, rid, created, first, items_out, usage),
                                     media_type="text/event-stream")
        result = await self._generate(req)
        content = await asyncio.to_thread(self._content, result)  # a PNG to encode: off the event loop
        return {
            "id": rid, "object": "chat.completion", "created": created, "model": self.config.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": result.finish_reason or "stop"}],
            "usage": self._usage(result),
            "seed": req.seed,
        }

    @staticmethod
    def _usage(result: GenerationResult) -> dict:
        """OpenAI's usage: prompt tokens are the rows of the context decoded (or denoised) from,
        image blocks included; completion tokens the text decoded (think text for images)."""
        completion = len(result.token_ids or result.think_token_ids or [])
        prompt = result.prompt_tokens or 0
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _content(self, result: GenerationResult) -> str | list[dict]:
        if result.image is None:
            return result.text
        parts = [] if result.think_text is None else [{"type": "text", "text": result.think_text}]
        parts.append({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png_base64(result.image)}"}})
        return parts

    async def _chat_stream(self, req: GenerationRequest, rid: str, created: int, first: Any,
                           rest: AsyncIterator[str | dict | GenerationResult], include_usage: bool) -> AsyncIterator[str]:
        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.config.model_name,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})

        async def items():
            yield first
            async for item in rest:
                yield item

        t0, status, previews = time.perf_counter(), "ok", 0
        yield chunk({"role": "assistant"})
        try:
            async for item in items():
                if isinstance(item, str):
                    yield chunk({"content": item})
                elif isinstance(item, dict):
                    if "partial_image" in item:  # a preview: as a data URL, numbered as OpenAI's partial images
                        url = f"data:image/png;base64,{await asyncio.to_thread(png_base64, item['partial_image'])}"
                        item = {**item, "partial_image": url, "partial_image_index": previews}
                        previews += 1
                    yield chunk({}, progress=item)
                else:
                    final = {} if item.image is None else {"content": await asyncio.to_thread(self._content, item)}
                    yield chunk(final, item.finish_reason or "stop", seed=req.seed)
                    if include_usage:  # OpenAI's last chunk: no choices, the usage
                        yield sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                                   "model": self.config.model_name, "choices": [], "usage": self._usage(item)})
        except Exception as exc:  # the stream has started: report in-band, with the status it would have had
            status = type(exc).__name__
            yield self._stream_error(exc, "messages")
        finally:
            await rest.aclose()  # on a disconnect too: cancels the replicas' work
            metrics.count_request(req.modality, status, time.perf_counter() - t0)
        yield "data: [DONE]\n\n"

    def _stream_error(self, exc: Exception, field: str) -> str:
        """The SSE error event that ends a stream once it has started (its headers, 200, are
        sent): the status and message the request would have had, in-band."""
        code, message, param, _ = failure(exc, self.config.request_timeout_s, self.config.retry_after_s, field, streaming=True)
        return sse(error_body(message, "server_error" if code >= 500 else "invalid_request_error", param, code))

    @api.post("/v1/images/generations", openapi_extra=_body("ImageGenerationRequest"), responses=_ERRORS)
    async def image_generations(self, request: Request):
        return await self._guard(request, "/v1/images/generations", ImageGenerationRequest, self._images)

    async def _images(self, body: ImageGenerationRequest):
        await self.bound_prompt(body.prompt, "prompt")
        height, width = await self._size(body.size)
        if height is None:
            height = width = await self._default_size()
        seed = self._seed(body)
        reqs = [body.request("text2img", body.prompt, None, s, height, width, partial_images=body.partial_images or 0)
                for s in body.seeds(seed)]
        return await self._image_answer(body, reqs, "image_generation")

    async def _image_answer(self, body: ImagesRequest, reqs: list[GenerationRequest], kind: str):
        """The images, or with `stream` OpenAI's image events: `{kind}.partial_image` for each
        preview, then `{kind}.completed`."""
        if not body.stream:
            return await self._image_list(body, await all_or_nothing(self._generate(r) for r in reqs))
        if len(reqs) != 1:
            raise InputError("a streamed request makes one image: n must be 1", "n", 422)
        items = self._stream(reqs[0])
        try:  # as for chat: a request refused at once gets its status, not a 200 stream
            first = await anext(items)
        except BaseException:
            await items.aclose()
            raise
        return StreamingResponse(self._image_events(body, reqs[0], kind, first, items), media_type="text/event-stream")

    async def _image_events(self, body: ImagesRequest, req: GenerationRequest, kind: str, first: Any,
                            rest: AsyncIterator[dict | GenerationResult]) -> AsyncIterator[str]:
        def event(name: str, image_b64: str, **fields) -> str:
            data = {"type": f"{kind}.{name}", "b64_json": image_b64, "created_at": int(time.time()),
                    "output_format": body.output_format, "quality": body.quality or "auto", "background": "opaque",
                    **fields}
            return f"event: {data['type']}\ndata: {json.dumps(data)}\n\n"

        t0, status, index = time.perf_counter(), "ok", 0
        try:
            item = first
            while True:
                if isinstance(item, GenerationResult):
                    size = f"{item.image.width}x{item.image.height}"
                    prompt, out = item.prompt_tokens or 0, len(item.latent_tokens) if item.latent_tokens is not None else 0
                    yield event("completed", await asyncio.to_thread(body.encode, item.image), size=size, seed=req.seed,
                                usage={"input_tokens": prompt, "output_tokens": out, "total_tokens": prompt + out})
                    break
                preview = item.get("partial_image") if isinstance(item, dict) else None
                if preview is not None:
                    yield event("partial_image", await asyncio.to_thread(body.encode, preview), partial_image_index=index,
                                size=f"{preview.width}x{preview.height}")
                    index += 1
                item = await anext(rest)
        except Exception as exc:  # the stream has started: report in-band, with the status it would have had
            status = type(exc).__name__
            yield self._stream_error(exc, "prompt")
        finally:
            await rest.aclose()  # on a disconnect too: cancels the replicas' work
            metrics.count_request(req.modality, status, time.perf_counter() - t0)

    async def _image_list(self, body: ImagesRequest, results: list[GenerationResult]) -> dict:
        """The response body. The images are encoded in a worker thread (tens of ms each), off
        the event loop that every other request to this replica waits on."""
        return await asyncio.to_thread(self._image_list_now, body, results)

    @staticmethod
    def _image_list_now(body: ImagesRequest, results: list[GenerationResult]) -> dict:
        data = []
        for r in results:
            item = {"b64_json": body.encode(r.image), "seed": r.seed}
            if r.think_text is not None:
                item["revised_prompt"] = r.think_text
            data.append(item)
        first = results[0].image
        return {"created": int(time.time()), "data": data, "output_format": body.output_format,
                "size": f"{first.width}x{first.height}", "quality": body.quality or "auto", "background": "opaque"}

    @api.post("/v1/images/edits", openapi_extra=_body(_EDIT_FORM, "multipart/form-data"), responses=_ERRORS)
    async def image_edits(self, request: Request):
        return await self._guard(request, "/v1/images/edits", None, lambda _: self._edits(request))

    async def _edits(self, request: Request):
        try:
            form = await request.form()
        except Exception as exc:  # malformed multipart
            raise InputError(f"expected a multipart/form-data body: {exc}") from None
        if "mask" in form:
            raise InputError("mask is not supported: BAGEL has no inpainting, it edits the whole image from the "
                             "prompt (say in the prompt what to change where)", "mask")
        uploads = form.getlist("image") + form.getlist("image[]")  # the SDK sends a list as image[]
        if not uploads or any(isinstance(u, str) for u in uploads):
            raise InputError("an image file is required", "image")
        if len(uploads) > MAX_INPUT_IMAGES:
            raise InputError(f"at most {MAX_INPUT_IMAGES} images per request", "image")
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
            if key in ("image", "image[]"):
                continue
            if not isinstance(value, str):
                raise InputError(f"{key} must be a form field, not a file", key, 422)
            fields[key] = value
        body = ImageEditRequest.from_form(fields)
        if body.model not in (None, self.config.model_name):
            raise InputError(f"model {body.model!r} is not served here", "model", 404)
        await self.bound_prompt(body.prompt, "prompt")
        datas = [await upload.read() for upload in uploads]
        *context, image = await asyncio.to_thread(
            lambda: [decode_image(d, "image", self.config.max_image_bytes, self.config.max_image_pixels) for d in datas])
        seed = self._seed(body)
        reqs = [body.request("img2img", body.prompt, image, s, context=tuple(context), partial_images=body.partial_images or 0)
                for s in body.seeds(seed)]
        return await self._image_answer(body, reqs, "image_edit")
