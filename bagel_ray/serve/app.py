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
    thinker = ThinkerServer.options(**cfg.thinker.serve_options("Thinker")).bind(raw)
    dit = DiTServer.options(**cfg.dit.serve_options("DiT")).bind(raw)
    return Driver.options(**cfg.ingress.serve_options("Driver")).bind(thinker, dit, raw)
