"""API keys of the HTTP API.

Keys come from the file the app config names (`access.api_keys_file`, one a line) and,
comma-separated, from the environment variable `BAGEL_RAY_API_KEYS` of the ingress replica,
both read once when the replica starts (never from the config itself, whose args Ray Serve
logs). A
request presents one as `Authorization: Bearer KEY`; it is compared with every configured
key in constant time (`hmac.compare_digest`, no early exit), so the answer time does not
tell how much of a key was right. Keys are never logged: this object's repr shows only how
many there are.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Iterable, Mapping

from bagel_ray.serve.config import AccessConfig

API_KEYS_ENV = "BAGEL_RAY_API_KEYS"


def read_key_file(path: str) -> list[str]:
    """The keys of a key file: one a line, blank lines and `#` comments skipped. A key with
    spaces or a comma in it is refused (its line number named, never its text)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"access.api_keys_file: cannot read {path}: {type(exc).__name__}") from None
    keys = []
    for number, line in enumerate(lines, 1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        if any(c.isspace() for c in key) or "," in key:
            raise ValueError(f"access.api_keys_file {path}, line {number}: a key cannot hold spaces or commas")
        keys.append(key)
    return keys


class AccessControl:
    def __init__(self, keys: Iterable[str], public_paths: Iterable[str] = ()) -> None:
        self._keys = tuple(key.encode("utf-8") for key in dict.fromkeys(keys) if key)
        self.public_paths = frozenset(public_paths)

    @classmethod
    def from_config(cls, config: AccessConfig, environ: Mapping[str, str]) -> "AccessControl":
        from_env = (key.strip() for key in environ.get(API_KEYS_ENV, "").split(","))
        from_file = read_key_file(config.api_keys_file) if config.api_keys_file else []
        return cls([*from_file, *from_env], config.public_paths)

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
