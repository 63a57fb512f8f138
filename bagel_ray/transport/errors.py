"""The error a receiver raises when the contexts it was promised no longer exist.

It speaks Ray's language on purpose: to the caller, a sender that dropped a handoff (too old,
its outbox full) or died with it is a sender that became unavailable for this request, and
the driver retries such a request once, from the start, on live replicas.
"""

from __future__ import annotations

from ray.exceptions import ActorUnavailableError


class HandoffGone(ActorUnavailableError):
    """The sender can no longer hand over these contexts; run the request again."""

    def __init__(self, message: str) -> None:
        super().__init__(message, None)
        self.message = message
        self.error_msg = message  # what str() shows

    def __reduce__(self):
        return (type(self), (self.message,))
