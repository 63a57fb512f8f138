"""Request bodies: JSON parsed and validated into the route's model, in a worker thread.

A body is at most `max_request_bytes` (32 MiB). On the event loop, parsing one that large
(`json.loads` alone: 120 ms for a 32 MiB prompt on this 2-core host under load) would hold up
every other request of the ingress replica, `/health` included, for all of it; in a thread
the loop runs between the C calls that hold the GIL. (A child process was tried and not
kept: pickling the body there and the model back held the GIL about as long, under load.)
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from pydantic import BaseModel

from bagel_ray.serve.errors import InputError


def parse_json(text: str | bytes, what: str, param: str | None = None, status: int = 400) -> Any:
    """JSON, with every way it can be malformed (nested deeper than Python's recursion limit
    included) as an `InputError`."""
    try:
        return json.loads(text)
    except RecursionError:
        raise InputError(f"{what} is nested too deeply", param, status) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise InputError(f"{what} is not valid JSON: {exc}", param, status) from None


def parse_body(raw: bytes, body_model: type[BaseModel]) -> BaseModel:
    """A JSON body validated into its model."""
    payload = parse_json(raw, "body")
    try:
        return body_model.model_validate(payload)
    except RecursionError:
        raise InputError("body is nested too deeply") from None


async def parse_body_off_loop(raw: bytes, body_model: type[BaseModel]) -> BaseModel:
    return await asyncio.to_thread(parse_body, raw, body_model)
