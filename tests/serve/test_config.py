"""The app config refuses every value Ray Serve or Ray would refuse later (issue 25 item 10):
a value that passed here and failed inside Serve left `serve run` retrying forever."""

from __future__ import annotations

from typing import get_args

import pytest
from pydantic import ValidationError

from bagel_ray.serve.app import build_app
from bagel_ray.serve.config import AppConfig, DiTConfig
from bagel_ray.transport.base import TRANSPORT_NAMES


@pytest.mark.parametrize("key,value", [
    ("ingress.max_queued_requests", 0),
    ("ingress.ray_actor_options.resources", {"GPU": 1}),
    ("thinker.ray_actor_options.resources", {"CPU": 2}),
    ("dit.ray_actor_options.resources", {"accelerator": -1}),
])
def test_values_ray_would_refuse_are_refused_here(key, value):
    *parents, leaf = key.split(".")
    args: dict = {}
    node = args
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    with pytest.raises(ValidationError, match=parents[0]):
        AppConfig.model_validate(args)


EDGES = [
    {},
    {"ingress": {"max_queued_requests": -1, "max_ongoing_requests": 1}},
    {"ingress": {"max_queued_requests": 1}},
    {"thinker": {"max_queued_requests": 0, "max_ongoing_requests": 1, "num_replicas": 1},
     "dit": {"max_queued_requests": 0, "max_ongoing_requests": 1, "num_replicas": 1}},
    {"thinker": {"max_queued_requests": -1}, "dit": {"max_queued_requests": -1}},
    {"thinker": {"autoscaling_config": {"min_replicas": 0, "max_replicas": 1, "initial_replicas": 0,
                                        "upscale_delay_s": 0, "downscale_delay_s": 0}}},
    {"dit": {"ray_actor_options": {"num_cpus": 0, "num_gpus": 0.5, "memory": 0, "resources": {"node_a": 0.1}}}},
]


@pytest.mark.parametrize("args", EDGES)
def test_every_value_accepted_here_is_accepted_by_serve(args):
    """`build_app` hands every deployment's options to Serve's own validation (`.options`)."""
    AppConfig.model_validate(args)
    build_app(args)


def test_the_config_offers_the_transports_there_are():
    """The config spells the transport names out (it may not import torch, which the transport
    registry does): they must stay those of the registry."""
    assert get_args(DiTConfig.model_fields["transport"].annotation) == TRANSPORT_NAMES
