"""Every way a request can fail, and the one map from an error to its HTTP answer.

The serving layer's own errors (`InputError`, `Overloaded`, `GroupBroken`) are defined here;
the engines' (`EngineOutOfMemory`, `PromptTooLong`, `Cancelled`) below Ray, in `engine/`, so that the
Ray-free workers can raise them. `failure` decides each error's status, message and headers,
for the driver's answers and its stream error events alike; the README's "What the service
promises" lists the result.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException

from bagel_ray.engine.cancel import Cancelled
from bagel_ray.engine.errors import EngineOutOfMemory, PromptTooLong

log = logging.getLogger("bagel_ray.serve.errors")

# A replica that died mid-request: the request is run once more (seeded, so identically).
RETRYABLE = (ActorDiedError, ActorUnavailableError)


class InputError(ValueError):
    """A client error with the field it concerns (mapped to a 4xx)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


class Overloaded(Exception):
    """A stage already has its limit of requests from this ingress replica."""


class GroupBroken(RuntimeError):
    """A rank of a parallel DiT replica's group (`serve/dit_group.py`) died or stopped
    answering: the request fails, and so do later ones on that replica until Serve has
    replaced it (its health check fails). Retryable: a replacement or another replica serves
    the same request."""


def replica_died(exc: BaseException) -> bool:
    """A stage replica died under this request: directly, or (Serve wraps it) the Thinker
    replica whose result the DiT call was waiting for."""
    return isinstance(exc, RETRYABLE) or (isinstance(exc, RayServeException) and isinstance(exc.__cause__, RETRYABLE))


def error_body(message: str, kind: str, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, headers: dict | None = None,
                   code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(error_body(message, kind, param, code), status_code=status, headers=headers)


def _names_a_field(part: str | int) -> bool:
    """Pydantic's error locations also hold union branch tags ('str', 'list[...]', 'TextPart')."""
    return isinstance(part, int) or not ("[" in part or part[:1].isupper() or part in ("body", "str", "int", "float", "bool"))


def validation_param(exc: ValidationError | RequestValidationError) -> tuple[str | None, str]:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"] if _names_a_field(p)) or None
    return param, f"{param}: {first['msg']}" if param else first["msg"]


def failure(exc: BaseException, timeout_s: float, retry_after_s: int, prompt_param: str = "prompt",
            streaming: bool = False) -> tuple[int, str, str | None, dict[str, str] | None]:
    """(status, message, param, headers) of an error raised while serving a request. Errors
    raised in a replica arrive as `RayTaskError`s that are also instances of their cause.
    `prompt_param`: the request field that holds the prompt (`messages` in a chat);
    `streaming`: the request was a stream, which is never retried."""
    cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
    retry = {"Retry-After": str(retry_after_s)}
    if isinstance(cause, InputError):
        return cause.status, str(cause), cause.param, None
    if isinstance(cause, PromptTooLong):
        return 422, str(cause), prompt_param if cause.param == "prompt" else cause.param, None
    if isinstance(cause, ValidationError):
        param, message = validation_param(cause)
        return 422, message, param, None
    if isinstance(cause, Overloaded):
        return 503, f"the service is at capacity ({cause}); retry later", None, retry
    if isinstance(cause, BackPressureError):
        after = cause.retry_after_s if cause.retry_after_s is not None else retry_after_s
        return 503, f"the service is at capacity ({cause.message}); retry later", None, {"Retry-After": str(int(after))}
    if isinstance(cause, DeploymentUnavailableError):
        return 503, f"the service is unavailable: {cause.message}", None, retry
    if isinstance(cause, asyncio.TimeoutError):
        return 504, f"the request did not finish within its deadline of {timeout_s}s; its work was stopped", None, None
    if isinstance(cause, EngineOutOfMemory):
        return 507, str(cause), None, None
    if replica_died(cause):
        if streaming:
            return 503, f"a replica died during the stream ({type(cause).__name__}); streams are not retried", None, retry
        return 503, f"a replica died during the request and again on its retry ({type(cause).__name__})", None, retry
    if isinstance(cause, GroupBroken):
        return 503, f"{cause}; retry later", None, retry
    if isinstance(cause, Cancelled):
        return 503, "the request was cancelled inside the service", None, retry
    log.error("request failed", exc_info=exc)
    return 500, f"internal error ({type(cause).__name__}); the request failed, the service goes on", None, None
