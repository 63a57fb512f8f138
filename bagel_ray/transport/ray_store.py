"""The Ray calls of the object store's by-reference handoff (`object_store.StoredContexts`):
put a piece, get pieces. A piece is owned by the process that put it (the sending replica), so
a piece whose owner died is a handoff that is gone (`HandoffGone`: the driver retries)."""

from __future__ import annotations

from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, ObjectLostError

from bagel_ray.transport.errors import HandoffGone

GET_TIMEOUT_S = 120.0


def put(piece: np.ndarray) -> Any:
    return ray.put(piece)


def get(refs: list[Any], timeout_s: float = GET_TIMEOUT_S) -> list[np.ndarray]:
    """The pieces of `refs`, zero-copy views of the object store where the node holds them."""
    try:
        return ray.get(refs, timeout=timeout_s)
    except ObjectLostError as exc:  # its owner died too
        raise HandoffGone(f"a KV handoff's pieces are gone from the object store ({type(exc).__name__})") from None
    except GetTimeoutError:
        raise HandoffGone(f"a KV handoff's pieces did not arrive within {timeout_s:.0f}s") from None
