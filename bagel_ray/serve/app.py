"""The one builder of the bagel-ray Serve app: `import_path: bagel_ray.serve.app:build_app`.

A plain dict (the `args` of a Serve config file) is validated into `AppConfig` before anything
deploys, so an unknown key or a bad value fails at start with its name; then the Thinker and
DiT deployments are bound, each with its own options, into the driver.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from bagel_ray.serve.config import AppConfig
from bagel_ray.serve.driver import Driver
from bagel_ray.serve.stages import DiTServer, ThinkerServer


def build_app(args: dict[str, Any] | None = None) -> Application:
    cfg = AppConfig.model_validate(args or {})
    raw = cfg.model_dump(mode="json")
    retry = cfg.retry_after_s
    # The driver admits text requests against the Thinker's limit and image requests against
    # the DiT's; an image request also makes one Thinker call (its prefill), and the driver one
    # more, once (its fetch of the model info).
    text, image = cfg.thinker.admission_limit(), cfg.dit.admission_limit()
    thinker_queue = None if text is None or image is None else text + image + 1
    thinker = ThinkerServer.options(**cfg.thinker.serve_options("Thinker", retry, thinker_queue)).bind(raw)
    dit = DiTServer.options(**cfg.dit.serve_options("DiT", retry, image)).bind(raw)
    return Driver.options(**cfg.ingress.serve_options("Driver", retry)).bind(thinker, dit, raw)
