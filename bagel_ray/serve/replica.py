"""What each replica of the app shares, without torch, engine or model code, so that the
CPU-only ingress imports it as the GPU stages do: where this package's logs go inside a Serve
replica, and the model facts the Thinker tells the driver (`ModelInfo`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ray import serve
from ray.serve.exceptions import RayServeException


def logs_into_serve() -> None:
    """In a Serve replica, this package's log records go where the replica's own do (its log
    file and the console of `serve run`): Serve sets up only its `ray.serve` logger there, so
    our INFO records (a stage ready, its load time, the transport it took) went nowhere.
    Outside a replica (tests, the engines alone) logging is left as it is."""
    try:
        serve.get_replica_context()
    except RayServeException:
        return
    serve_logger, ours = logging.getLogger("ray.serve"), logging.getLogger("bagel_ray")
    ours.handlers = list(serve_logger.handlers)
    ours.setLevel(serve_logger.level)
    ours.propagate = False


@dataclass(frozen=True)
class ModelInfo:
    """What the driver needs to validate requests without loading the model or its tokenizer."""

    max_image_side: int
    latent_downsample: int
    max_model_len: int
    max_token_bytes: int  # the most UTF-8 bytes one token stands for

    def max_prompt_chars(self, ascii_only: bool) -> int:
        """The most characters a prompt that fits `max_model_len` can have: the cheap bound
        checked at the ingress before anything tokenizes it (the exact count is the Thinker's).
        A text of n bytes is at least n / max_token_bytes tokens; an ASCII text has one byte a
        character, and NFC, applied before tokenizing, merges at most 4 characters into one
        (U+1F86 is four code points decomposed), so other text may have 4x as many characters."""
        return self.max_model_len * self.max_token_bytes * (1 if ascii_only else 4)
