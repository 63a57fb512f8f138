"""Stopping a request's work inside an engine loop.

Engines take a `should_stop` callable (no arguments, returns a bool) and ask it once per
step, between steps, on the host: it costs one Python call and never touches the device.
When it says yes the loop raises `Cancelled`, so the work of a request whose caller has gone
(deadline passed, client disconnected) stops at the next step instead of running to the end.
"""

from __future__ import annotations


class Cancelled(Exception):
    """The request's caller no longer wants the result; its work stopped early."""
