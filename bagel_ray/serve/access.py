"""API keys of the HTTP API.

Keys come from the app config (`access.api_keys`) and, comma-separated, from the environment
variable `BAGEL_RAY_API_KEYS` of the ingress replica, read once when the replica starts. A
request presents one as `Authorization: Bearer KEY`; it is compared with every configured
key in constant time (`hmac.compare_digest`, no early exit), so the answer time does not
tell how much of a key was right. Keys are never logged: this object's repr shows only how
many there are.
"""

from __future__ import annotations

import hmac
from typing import Iterable, Mapping

from bagel_ray.serve.config import AccessConfig

API_KEYS_ENV = "BAGEL_RAY_API_KEYS"


class AccessControl:
    def __init__(self, keys: Iterable[str], public_paths: Iterable[str] = ()) -> None:
        self._keys = tuple(key.encode("utf-8") for key in dict.fromkeys(keys) if key)
        self.public_paths = frozenset(public_paths)

    @classmethod
    def from_config(cls, config: AccessConfig, environ: Mapping[str, str]) -> "AccessControl":
        from_env = (key.strip() for key in environ.get(API_KEYS_ENV, "").split(","))
        return cls([*config.api_keys, *from_env], config.public_paths)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def allows(self, path: str, authorization: str | None) -> bool:
        """Whether a request for `path` with this Authorization header may proceed."""
        if not self._keys or path in self.public_paths:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        presented = token.strip().encode("utf-8")
        matched = False
        for key in self._keys:  # every key is compared, whatever matched before
            matched |= hmac.compare_digest(presented, key)
        return matched

    def __repr__(self) -> str:
        return f"AccessControl({len(self._keys)} keys, public={sorted(self.public_paths)})"
