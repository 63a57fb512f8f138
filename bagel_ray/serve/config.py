"""Strict, loadable configs of a bagel-ray Serve app (`deployments/*.yaml`, the `args` block).

Every stage knob is a typed field; an unknown key or a bad value fails at start with a
message naming it. `serve_options` is the one place where a stage's Ray Serve options are
derived from its config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bagel_ray.serve.schemas import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS


def _serve_queue_bound(value: int) -> int:
    """A max_queued_requests handed to Serve as is: Serve takes -1 (unbounded) or >= 1."""
    if value == 0:
        raise ValueError("must be -1 (unbounded) or at least 1 (Ray Serve refuses 0)")
    return value


class StrictModel(BaseModel):
    """Errors name the key and the problem, never the value given (it may be a secret)."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class AutoscalingConfig(StrictModel):
    """Ray Serve's autoscaling keys that matter here (the rest keep Serve's defaults)."""

    min_replicas: int = Field(1, ge=0)
    initial_replicas: int | None = Field(None, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    metrics_interval_s: float = Field(10.0, gt=0)
    look_back_period_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie within [min_replicas, max_replicas]")
        return self


class ActorOptions(StrictModel):
    """Resources of each replica. `num_cpus` is explicit because Ray's default (1 CPU a
    replica) starves small machines; `resources` pins a stage to a node type."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    memory: int | None = Field(None, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)
    accelerator_type: str | None = None
    runtime_env: dict[str, Any] | None = None

    @field_validator("resources")
    @classmethod
    def _ray_takes_them(cls, resources: dict[str, float]) -> dict[str, float]:
        """What Ray refuses when the replica is created, refused here before deploying."""
        if {"CPU", "GPU"} & set(resources):
            raise ValueError("CPU and GPU go in num_cpus and num_gpus, not in resources")
        negative = sorted(name for name, amount in resources.items() if amount < 0)
        if negative:
            raise ValueError(f"resource amounts cannot be negative ({', '.join(negative)})")
        return resources

    def to_ray(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True, exclude_defaults=False)


class StageConfig(StrictModel):
    """Knobs shared by both stages."""

    num_replicas: int | None = Field(None, ge=1, description="fixed replica count; leave unset to autoscale")
    autoscaling_config: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    max_ongoing_requests: int = Field(4, ge=1, description="requests a replica takes at once; the rest queue")
    max_queued_requests: int = Field(
        64, ge=-1, description="requests waiting for a replica, per ingress replica, before a 503; -1 unbounded"
    )
    ray_actor_options: ActorOptions = Field(default_factory=ActorOptions)
    max_replicas_per_node: int | None = Field(
        None, ge=1, description="most replicas of this stage on one node (1: a node lost takes one replica with it)"
    )
    device: Literal["auto", "cuda", "cpu"] = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="bfloat16 on a GPU and float32 on a CPU when auto"
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="fraction of GPU memory this replica may use")
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    startup_timeout_s: float = Field(
        1800.0, gt=0, description="a replica whose engine has not loaded by then fails its start (Serve starts another)"
    )

    def admission_limit(self) -> int | None:
        """Requests of this stage that one ingress replica lets in at once (running plus
        queued): max_ongoing_requests a replica (of num_replicas, or of max_replicas when
        autoscaled) plus max_queued_requests. None: unbounded."""
        if self.max_queued_requests < 0:
            return None
        replicas = self.num_replicas if self.num_replicas is not None else self.autoscaling_config.max_replicas
        return self.max_ongoing_requests * replicas + self.max_queued_requests

    def serve_options(self, name: str, retry_after_s: int, queue_bound: int | None) -> dict[str, Any]:
        """`queue_bound`: Serve's own max_queued_requests for this deployment. The driver
        enforces the admission limits exactly; Serve's bound, set at or above what the driver
        lets through, only guards callers that bypass it (Serve counts a request as queued
        until a replica's slot is seen free, which lags, so its bound alone refuses early)."""
        options: dict[str, Any] = {
            "name": name,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": -1 if queue_bound is None else queue_bound,
            "backpressure_config": {"status_code": 503, "retry_after_s": retry_after_s},
            "ray_actor_options": self.ray_actor_options.to_ray(),
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
        }
        if self.max_replicas_per_node is not None:
            options["max_replicas_per_node"] = self.max_replicas_per_node
        if self.num_replicas is not None:
            options["num_replicas"] = self.num_replicas
        else:
            options["autoscaling_config"] = self.autoscaling_config.model_dump(exclude_none=True)
        return options


class ThinkerConfig(StageConfig):
    max_batch_size: int = Field(8, ge=1, description="text requests decoded together (continuous batch slots)")
    max_decode_len: int = Field(
        2048, ge=16, description="rows of each continuous-batch slot (context + new tokens + the 8 steps a sequence may "
        "run past its end in a chunk); longer requests decode alone"
    )
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="how long a batch waits to fill")
    max_model_len: int = Field(32768, ge=16, description="longest context plus new tokens a request may use")


class ParallelSettings(StrictModel):
    """One image over several ranks of one DiT replica (`engine/dit_parallel.py`,
    `serve/dit_group.py`): `cfg` ranks for a request's CFG branches times `sequence` ranks for
    a branch's rows. Each rank takes one bundle of the replica's placement group, the size of
    `ray_actor_options`; the replica is rank 0. `sequence` must divide the model's head counts
    (28 query / 4 KV heads for BAGEL-7B: 1, 2 or 4), checked when the replica starts."""

    cfg: int = Field(1, ge=1, le=3, description="ranks for the CFG branches (a request has at most 3)")
    sequence: int = Field(1, ge=1, description="ranks a branch's latent rows are split over (Ulysses)")
    timeout_s: float = Field(120.0, gt=0, description="how long a rank waits in a collective before the group counts as broken")
    start_timeout_s: float = Field(1800.0, gt=0, description="how long the replica waits for its worker ranks to load the model")
    cuda_graphs: bool = Field(
        False, description="on GPUs, each rank replays its layers as CUDA graphs between the split attentions, as one "
        "GPU does; off until it has run on GPUs (its test, tests/engine/test_dit_graphs.py, has not yet)")

    @property
    def size(self) -> int:
        return self.cfg * self.sequence


class DiTConfig(StageConfig):
    max_ongoing_requests: int = Field(
        8, ge=1, description="requests a replica takes at once (a batch can hold no more); the rest queue"
    )
    # transport.base.TRANSPORT_NAMES (tests/serve/test_config.py holds them equal); not imported
    # from there, which imports torch, since the ingress reads this config
    transport: Literal["auto", "object_store", "cuda_ipc", "nccl"] = Field(
        "auto", description="how KV contexts reach this stage from the Thinker"
    )
    max_batch_size: int = Field(
        8, ge=1, description="image requests of the same size denoised together, step by step (1: one at a time)"
    )

    parallel: ParallelSettings = Field(default_factory=ParallelSettings)

    def rank_bundle(self) -> dict[str, float]:
        """One rank's placement-group bundle: the replica's own resources (Serve places the
        replica in the first bundle, which must hold them)."""
        actor = self.ray_actor_options
        bundle = {"CPU": actor.num_cpus, "GPU": actor.num_gpus, **actor.resources}
        if actor.memory is not None:
            bundle["memory"] = actor.memory
        return {k: v for k, v in bundle.items() if v}

    def serve_options(self, name: str, retry_after_s: int, queue_bound: int | None) -> dict[str, Any]:
        """A replica of a parallel DiT owns one bundle per rank, all on one node (STRICT_PACK)."""
        options = super().serve_options(name, retry_after_s, queue_bound)
        if self.parallel.size > 1:
            options["placement_group_bundles"] = [self.rank_bundle() for _ in range(self.parallel.size)]
            options["placement_group_strategy"] = "STRICT_PACK"
        return options


# Requests an ingress replica takes beyond its API admission limit: /health, /v1/models, the
# docs, unknown routes and the instant 503s of requests past the limit. Serve counts them all.
INGRESS_HEADROOM = 64


class IngressConfig(StrictModel):
    """The HTTP driver: light, CPU only."""

    num_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(
        256, ge=1, description="API requests (POST) an ingress replica takes at once; past it a JSON 503 + Retry-After"
    )
    max_queued_requests: int = Field(
        1024, ge=-1, description="Serve's queue before the ingress replicas, -1 unbounded: Serve counts a request from its "
        "arrival at the proxy until an ingress replica has taken it, so this bounds requests arriving together (past it "
        "Serve's plain-text 503, whatever API slots are free): keep it above the largest burst"
    )
    ray_actor_options: ActorOptions = Field(default_factory=lambda: ActorOptions(num_cpus=0.5))

    @field_validator("max_queued_requests")
    @classmethod
    def _serve_takes_it(cls, value: int) -> int:
        return _serve_queue_bound(value)

    def serve_options(self, name: str, retry_after_s: int) -> dict[str, Any]:
        """Serve's own limit sits INGRESS_HEADROOM above the driver's admission, so that Serve
        never refuses (with its plain-text 503) before the driver does, and /health is
        answered while the API routes are full. Serve's queue bound still applies before that:
        requests arriving together count as queued until a replica takes them, so a small
        `max_queued_requests` refuses some of a burst while API slots are free."""
        return {
            "name": name,
            "num_replicas": self.num_replicas,
            "max_ongoing_requests": self.max_ongoing_requests + INGRESS_HEADROOM,
            "max_queued_requests": self.max_queued_requests,
            "backpressure_config": {"status_code": 503, "retry_after_s": retry_after_s},
            "ray_actor_options": self.ray_actor_options.to_ray(),
        }


class AccessConfig(StrictModel):
    """API keys for the HTTP API. The keys themselves are never in the config: Ray Serve logs
    an application's args (to the console of `serve run` and the controller's log) when it
    deploys one from a config file. They come, one a line, from the file `api_keys_file` names
    and, comma-separated, from the environment variable `BAGEL_RAY_API_KEYS` of the ingress
    replicas; both are read when a replica starts. With no key anywhere the API is open."""

    api_keys_file: str | None = Field(
        None, description="a file on the ingress nodes holding the accepted keys, one a line (blank lines and # comments "
        "skipped); requests present one as Authorization: Bearer KEY"
    )
    public_paths: list[Literal["/health", "/v1/models"]] = Field(
        default_factory=lambda: ["/health"], description="GET paths answered without a key when keys are set"
    )

    @model_validator(mode="before")
    @classmethod
    def _no_keys_here(cls, data: Any) -> Any:
        if isinstance(data, dict) and "api_keys" in data:
            raise ValueError("api_keys cannot be given in the config, where Ray Serve would log them with the app's "
                             "args; put them in a file named by access.api_keys_file, or in BAGEL_RAY_API_KEYS")
        return data


class AppConfig(StrictModel):
    """The `args` of a bagel-ray Serve app."""

    model: str = Field("tiny", description="checkpoint folder, hub id, or 'tiny' (the embedded random model)")
    model_name: str = Field("bagel", description="the id /v1/models reports and requests may name")
    edit_contexts_on: Literal["thinker", "dit"] = Field(
        "dit",
        description="who builds img2img contexts (VAE + ViT + prompt): the DiT alone (no KV handoff, the DiT "
        "also loads the ViT and lm_head) or the Thinker (which then also loads the generation expert and VAE)",
    )
    request_timeout_s: float = Field(600.0, gt=0, description="per-request deadline; past it the request gets a 504")
    body_timeout_s: float = Field(
        30.0, gt=0, description="a request body not all received within this many seconds gets a 408 (slow uploads)"
    )
    max_request_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="largest HTTP body accepted (413 past it)")
    max_image_bytes: int = Field(MAX_IMAGE_BYTES, ge=1024, description="largest encoded input image (413 past it)")
    max_image_pixels: int = Field(MAX_IMAGE_PIXELS, ge=256, description="most pixels of a decoded input image (413 past it)")
    retry_after_s: int = Field(5, ge=0, description="Retry-After of a 503 (at capacity, or a replica failed twice)")
    metrics_export_port: int | None = Field(
        None, ge=1, le=65535,
        description="port of each node's Prometheus metrics (Ray's --metrics-export-port, random unless a node is "
        "started with it): `bagel-ray serve` starts its Ray with it, a cluster's nodes must be started with it; the "
        "Driver's ready line says where the metrics are and warns when its node's port differs")
    access: AccessConfig = Field(default_factory=AccessConfig)
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    thinker: ThinkerConfig = Field(default_factory=ThinkerConfig)
    dit: DiTConfig = Field(default_factory=DiTConfig)

    def public_dump(self) -> dict[str, Any]:
        """The config as JSON: what may be shown or logged (it holds no API key, only where
        the keys are)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_file(cls, path: str | Path) -> "AppConfig":
        """An app config from YAML: either the args alone, or a Serve config file whose first
        application's `args` holds them."""
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if "applications" in raw:
            raw = raw["applications"][0].get("args", {})
        return cls.model_validate(raw)
