"""The driver's map from an error to its HTTP answer, including errors raised in a replica
(they arrive as `RayTaskError`s that are also instances of their cause)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from pydantic import ValidationError
from ray.exceptions import ActorDiedError, RayTaskError
from ray.serve.exceptions import BackPressureError, RayServeException

from bagel_ray.serve.errors import GroupBroken, Overloaded, failure, replica_died
from bagel_ray.serve.schemas import ChatCompletionRequest, InputError
from bagel_ray.engine.errors import EngineOutOfMemory
from bagel_ray.serve.workers import out_of_memory


def from_replica(cause: Exception) -> Exception:
    return RayTaskError("DiT.render", "Traceback (most recent call last): ...", cause).as_instanceof_cause()


def upstream_died() -> RayServeException:
    wrapped = RayServeException("Request to deployment 'DiT' failed because an upstream actor died")
    wrapped.__cause__ = ActorDiedError()
    return wrapped


def bad_body() -> ValidationError:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "top_p": 3})
    return info.value


@pytest.mark.parametrize("exc,status,param,retry_after", [
    (InputError("prompt too long", "messages", 422), 422, "messages", None),
    (from_replica(InputError("bad image", "image", 413)), 413, "image", None),
    (bad_body(), 422, "top_p", None),
    (Overloaded("the DiT stage is at its limit"), 503, None, "7"),
    (BackPressureError(5, 5, 503, 2.0), 503, None, "2"),
    (asyncio.TimeoutError(), 504, None, None),
    (from_replica(out_of_memory("render", torch.cuda.OutOfMemoryError("CUDA out of memory"))), 507, None, None),
    (ActorDiedError(), 503, None, "7"),
    (upstream_died(), 503, None, "7"),
    (from_replica(GroupBroken("the DiT replica's process group is broken: a worker rank is gone")), 503, None, "7"),
    (GroupBroken("the DiT replica's process group is broken"), 503, None, "7"),
    (from_replica(ValueError("a bug")), 500, None, None),
])
def test_failure_statuses(exc, status, param, retry_after):
    got_status, message, got_param, headers = failure(exc, timeout_s=30, retry_after_s=7)
    assert (got_status, got_param) == (status, param)
    assert message and "Traceback" not in message
    assert (headers or {}).get("Retry-After") == retry_after


def test_which_errors_are_retried():
    assert replica_died(ActorDiedError()) and replica_died(upstream_died())
    assert not replica_died(RayServeException("other")) and not replica_died(from_replica(ValueError("x")))
    assert isinstance(from_replica(out_of_memory("x", RuntimeError("oom"))), EngineOutOfMemory)
