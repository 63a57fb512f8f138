"""Bulk items through a bagel-ray Serve app that is already running (`--app NAME`).

The driver reads the items, builds each request here (a bad item fails without reaching the
app) and calls the app's `generate` through `serve.get_app_handle(NAME)`, keeping up to
`max_in_flight` requests in flight (by default as many as both stages queue without
refusing), and hands the results back as they complete, in any order.

An error raised by the request itself in the app (a RayTaskError whose cause is not a Ray
system error, e.g. a context longer than the model takes, or the app's per-request
deadline) fails that item. Anything else (the app gone, a replica that died twice) stops the
job: a rerun resumes it.
"""

from __future__ import annotations

import time
from dataclasses import replace
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Iterator

from bagel_ray.engine.request import GenerationRequest
from bagel_ray.flags import UsageError, fit_size
from bagel_ray.jobs.inputs import ItemError, JobInput, Scan, build_request, failed_outcome, read_chunk
from bagel_ray.jobs.store import Outcome


def item_error(exc: BaseException) -> str | None:
    """The message if `exc` is the request's own failure, None if it is the system's."""
    from ray.exceptions import RayError, RayTaskError

    if isinstance(exc, RayTaskError) and not isinstance(exc.cause, RayError):
        return f"{type(exc.cause).__name__}: {exc.cause}"
    return None


class AppRunner:
    def __init__(self, name: str, address: str | None, max_in_flight: int | None, model: str | None) -> None:
        import ray
        from ray import serve
        from ray.serve.schema import ApplicationStatus

        from bagel_ray.serve.config import AppConfig
        from bagel_ray.serve.deploy import AppSession, connect

        started_ray = connect(address)
        try:
            status = serve.status().applications.get(name)
            if status is None or status.status != ApplicationStatus.RUNNING:
                state = "does not exist" if status is None else f"is {status.status.value}"
                raise UsageError(f"Serve app {name!r} {state}; deploy it first (serve deploy / serve run), "
                                 "or leave out --app to run standalone with Ray Data")
            handle = serve.get_app_handle(name)
            config = AppConfig.model_validate(handle.app_config.remote().result())
            if model is not None and model != config.model:
                raise UsageError(f"--model {model} differs from the model of Serve app {name!r} ({config.model}); "
                                 "drop --model to use the app as it runs")
            self.session = AppSession(handle, name, config, deployed=False, started_ray=started_ray)
            self.max_image_side = handle.model_info.remote().result().max_image_side
        except BaseException:
            if started_ray:
                ray.shutdown()
            raise
        self.max_in_flight = max_in_flight or self.session.max_in_flight

    def describe(self) -> str:
        return (f"through Serve app {self.session.name!r} (model {self.session.config.model}), "
                f"up to {self.max_in_flight} requests in flight")

    def _call(self, item_id: str, req: GenerationRequest, responses: dict) -> Outcome:
        start = time.perf_counter()
        response = self.session.handle.generate.remote(replace(req, return_latents=False))  # it writes PNGs and text
        responses[item_id] = response
        try:
            result = response.result()
        except Exception as exc:
            message = item_error(exc)
            if message is None:
                raise
            return Outcome.failed(item_id, message, req.modality, req.seed)
        finally:
            responses.pop(item_id, None)
        result.timings["total_s"] = time.perf_counter() - start
        return Outcome.of_result(item_id, result)

    def outcomes(self, job: JobInput, scan: Scan) -> Iterator[Outcome]:
        items = (item for chunk in scan.chunks for item in read_chunk(job, chunk))
        pool = ThreadPoolExecutor(max_workers=self.max_in_flight, thread_name_prefix="bulk-request")
        pending: set[Future] = set()
        responses: dict[str, Any] = {}  # id -> DeploymentResponse, to cancel on the way out
        try:
            for item in items:
                try:
                    req = fit_size(build_request(item, job), self.max_image_side)
                except (ItemError, UsageError) as exc:
                    yield failed_outcome(item, job, str(exc))
                    continue
                pending.add(pool.submit(self._call, item.id, req, responses))
                while len(pending) >= self.max_in_flight:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    yield from (f.result() for f in done)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from (f.result() for f in done)
        finally:
            for response in list(responses.values()):  # a failure or an interrupt: drop the rest
                response.cancel()
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self.session.close()
