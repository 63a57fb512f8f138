"""Deploy-or-reuse of the bagel-ray Serve app for a job that sends its requests through a
handle (`bagel-ray generate --worker-backend ray`), and the app `bagel-ray serve` runs.

A job uses what is already there and tears down only what it started:

- Ray already initialized in this process is used as is; otherwise `ray.init(address)`
  connects (or starts a local cluster) and `close` shuts it down again.
- An app of the config file's name that is RUNNING is used as is. The settings the job
  pins (the CLI's explicit `--model`/`--dtype`/`--device`) must agree with it; other
  differences from the file are reported, not fixed. Otherwise the app is deployed from
  the file, like `serve run FILE`, and `close` deletes it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from bagel_ray.serve.config import AppConfig

log = logging.getLogger("bagel_ray.serve")

IMPORT_PATH = "bagel_ray.serve.app:build_app"
# Keys of a Serve config file this deploy path honours; any other would be silently dropped.
FILE_KEYS = frozenset({"proxy_location", "http_options", "applications"})
APP_KEYS = frozenset({"name", "route_prefix", "import_path", "args"})
UNBOUNDED_IN_FLIGHT = 256  # requests a job keeps in flight when neither stage bounds its queue


class DeployError(ValueError):
    """A config file, flag or running app this job cannot use; the message names the key."""


def describe(exc: ValidationError, prefix: str = "") -> str:
    """Pydantic errors as `key.path: message; ...` (one line)."""
    return "; ".join(f"{prefix}{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dicts as dotted keys -> leaf values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@dataclass(frozen=True)
class AppSpec:
    """One application of a Serve config file: what `serve run FILE` would deploy."""

    name: str
    route_prefix: str | None
    config: AppConfig
    proxy_location: str | None = None
    http_options: dict[str, Any] | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> "AppSpec":
        """A Serve config file holding one application of this package's builder, or a file
        holding only its `args` (then named `bagel`, at `/`)."""
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise DeployError(f"cannot read Serve config {path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise DeployError(f"{path}: expected a mapping at the top level")
        if "applications" not in raw:
            return cls("bagel", "/", _validated(raw, path, "args."))
        unknown = sorted(set(raw) - FILE_KEYS)
        if unknown:
            raise DeployError(f"{path}: unsupported key {', '.join(unknown)} (this deploy honours {', '.join(sorted(FILE_KEYS))})")
        apps = raw["applications"]
        if not isinstance(apps, list) or len(apps) != 1 or not isinstance(apps[0], dict):
            raise DeployError(f"{path}: applications must list exactly one application")
        app = apps[0]
        unknown = sorted(set(app) - APP_KEYS)
        if unknown:
            raise DeployError(f"{path}: unsupported key applications[0].{', '.join(unknown)} "
                              f"(this deploy honours {', '.join(sorted(APP_KEYS))})")
        if app.get("import_path") != IMPORT_PATH:
            raise DeployError(f"{path}: applications[0].import_path must be {IMPORT_PATH}, got {app.get('import_path')!r}")
        return cls(
            name=str(app.get("name", "default")),
            route_prefix=app.get("route_prefix", "/"),
            config=_validated(app.get("args") or {}, path, "applications[0].args."),
            proxy_location=raw.get("proxy_location"),
            http_options=raw.get("http_options"),
        )

    def with_settings(self, settings: dict[str, Any]) -> "AppSpec":
        """The spec with dotted config keys (`model`, `thinker.dtype`, ...) set and revalidated."""
        raw = self.config.model_dump(mode="json")
        for key, value in settings.items():
            *parents, leaf = key.split(".")
            node = raw
            for part in parents:
                node = node[part]
            node[leaf] = value
        try:
            config = AppConfig.model_validate(raw)
        except ValidationError as exc:
            raise DeployError(describe(exc)) from None
        return AppSpec(self.name, self.route_prefix, config, self.proxy_location, self.http_options)


def _validated(args: Any, path: str | Path, prefix: str) -> AppConfig:
    try:
        return AppConfig.model_validate(args)
    except ValidationError as exc:
        raise DeployError(f"{path}: {describe(exc, prefix)}") from None


def connect(address: str | None) -> bool:
    """Ray for this job: the in-process connection if there is one, else `ray.init(address)`.
    Returns whether this call initialized Ray (and so should shut it down)."""
    import ray

    if ray.is_initialized():
        if address is not None:
            log.info("Ray is already initialized in this process; using it, not %s", address)
        return False
    # Replica logs stay in the cluster's log folder instead of interleaving with progress bars.
    try:
        ray.init(address=address, log_to_driver=False, include_dashboard=False)
    except (ConnectionError, ray.exceptions.AuthenticationError) as exc:
        if address is None:
            raise
        raise ConnectionError(f"{exc}. {TOKEN_AUTH_HINT}") from exc
    return True


# The one line a refused connection gets: Ray's own answer to a missing token is 25 s of
# "Unauthenticated" retries, then "Failed to connect", naming neither variable.
TOKEN_AUTH_HINT = ("If the cluster uses Ray's token auth, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN to its token "
                   "(`ray get-auth-token` on the head node prints it)")


@dataclass
class AppSession:
    """A handle on the app for one job. `open` reuses or deploys; `close` undoes only what
    `open` started."""

    handle: Any
    name: str
    config: AppConfig  # what the app runs with
    deployed: bool
    started_ray: bool
    drift: list[str] = field(default_factory=list)  # keys where a reused app differs from the file

    @classmethod
    def open(cls, spec: AppSpec, address: str | None, pinned: frozenset[str] = frozenset()) -> "AppSession":
        """`pinned`: dotted keys the caller set on purpose; a reused app must agree on them."""
        started_ray = connect(address)
        try:
            return cls._attach(spec, pinned, started_ray)
        except BaseException:
            if started_ray:
                import ray

                ray.shutdown()
            raise

    @classmethod
    def _attach(cls, spec: AppSpec, pinned: frozenset[str], started_ray: bool) -> "AppSession":
        from ray import serve
        from ray.serve.schema import ApplicationStatus

        status = serve.status().applications.get(spec.name)
        if status is None:
            return cls(_deploy(spec, handle_only=started_ray), spec.name, spec.config, deployed=True, started_ray=started_ray)
        if status.status != ApplicationStatus.RUNNING:
            raise DeployError(f"Serve app {spec.name!r} exists but is {status.status.value}, not RUNNING; "
                              f"wait for it, or remove it with `serve shutdown` / serve.delete({spec.name!r})")
        handle = serve.get_app_handle(spec.name)
        running = AppConfig.model_validate(handle.app_config.remote().result())
        # the running app reports its API keys masked: compare the masked forms
        want, got = flatten(spec.config.public_dump()), flatten(running.model_dump(mode="json"))
        drift = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
        conflicts = [k for k in drift if k in pinned]
        if conflicts:
            parts = ", ".join(f"{k}={got.get(k)!r} (asked {want.get(k)!r})" for k in conflicts)
            raise DeployError(f"the running Serve app {spec.name!r} has {parts}; drop the flag to use it as it runs, "
                              f"or deploy under another application name")
        return cls(handle, spec.name, running, deployed=False, started_ray=started_ray, drift=drift)

    def close(self) -> None:
        try:
            if self.deployed:
                from ray import serve

                serve.delete(self.name)
        finally:
            if self.started_ray:
                import ray

                ray.shutdown()

    @property
    def max_in_flight(self) -> int:
        """Requests a job keeps in flight: as many as both stages queue without refusing any."""
        bounds = [s.max_queued_requests for s in (self.config.thinker, self.config.dit) if s.max_queued_requests >= 0]
        return max(1, min(bounds, default=UNBOUNDED_IN_FLIGHT))


@dataclass
class ServedApp:
    """An app served from a Serve config file by `bagel-ray serve FILE`, as `serve run
    --address local FILE` serves it, plus what `serve run` cannot do: the Ray it starts has its
    metrics export port fixed to the config's `metrics_export_port` (a Serve config has no
    field for it, and Ray picks one at random). Given an address it deploys into that cluster
    instead, whose nodes keep the ports they were started with. `stop` undoes what `start` did:
    a Ray it started stops, an app it deployed into a cluster is deleted."""

    spec: AppSpec
    started_ray: bool
    metrics: str  # where the head's metrics are, as the Driver's ready line says it

    @classmethod
    def start(cls, spec: AppSpec, address: str | None) -> "ServedApp":
        import ray

        from bagel_ray.serve.metrics import metrics_location

        if address is None:  # a Ray of its own, never one `ray start` left on the machine (RAY_ADDRESS included)
            ray.init(address="local", namespace="serve", _metrics_export_port=spec.config.metrics_export_port)
            started_ray = True
        else:
            try:
                ray.init(address=address, namespace="serve")
            except (ConnectionError, ray.exceptions.AuthenticationError) as exc:
                raise ConnectionError(f"{exc}. {TOKEN_AUTH_HINT}") from exc
            started_ray = False
        try:
            _deploy(spec)
        except BaseException:
            ray.shutdown()
            raise
        return cls(spec, started_ray, metrics_location(spec.config.metrics_export_port))

    @property
    def url(self) -> str:
        options = self.spec.http_options or {}
        return f"http://{options.get('host', '127.0.0.1')}:{options.get('port', 8000)}{self.spec.route_prefix or '/'}"

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            if not self.started_ray:
                serve.delete(self.spec.name)
        finally:
            ray.shutdown()


def _deploy(spec: AppSpec, handle_only: bool = False) -> Any:
    """`handle_only`: the app lives in a Ray this process started, for its own handle, so it
    gets no HTTP proxy: the config's port (8000) may be a server of the user's, in another Ray."""
    from ray import serve

    from bagel_ray.serve.app import build_app

    if handle_only:
        serve.start(proxy_location="Disabled")
    else:
        serve.start(proxy_location=spec.proxy_location, http_options=spec.http_options)  # no-op if Serve runs
    log.info("deploying Serve app %r", spec.name)
    try:
        return serve.run(build_app(spec.config.model_dump(mode="json")), name=spec.name, route_prefix=spec.route_prefix)
    except BaseException:
        # Leave no half-deployed app behind for the next job to trip over.
        serve.delete(spec.name)
        raise
