"""bagel-ray: BAGEL-7B-MoT served on Ray, with Thinker and DiT stages.

`bagel_ray.Client` is imported lazily so that the model and engine layers load without Ray."""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "Client":
        from bagel_ray.client import Client

        return Client
    raise AttributeError(name)
