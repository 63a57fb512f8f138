"""Typed failures of one request inside an engine, below Ray and HTTP.

The engines and the replicas' workers raise these; the serving layer maps each to its HTTP
status in one place (`serve/errors.py`). Their extra fields live in `__dict__`, so they
survive pickling across Ray as a replica's error.
"""

from __future__ import annotations


class EngineOutOfMemory(RuntimeError):
    """The accelerator ran out of memory for one request on its own. The replica has given
    the cached memory back and keeps serving; the driver answers 507."""


class PromptTooLong(ValueError):
    """A request's text (with the tokens it may decode) does not fit `max_model_len`. Raised
    where its tokens are made, before any model work; `param` names the field to change."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
