"""Route planning of the GPU-direct transport: where each side of a handoff is, what the
sender's payload says, and which route a handoff takes (`plan_route`, the whole decision table
of `direct.py`'s docstring). Pure data and one function: no Ray, no CUDA calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bagel_ray.transport.layout import ContextsLayout

GPU_ROUTES = ("cuda_ipc", "nccl")


@dataclass(frozen=True)
class Placement:
    """Where one side of a handoff is: its node, the GPU its contexts are on (sender) or
    will be received onto (receiver; None for host memory), the GPUs this process can open
    (for CUDA IPC), and whether NCCL works there."""

    node: str
    gpu: str | None
    visible: tuple[str, ...] = ()
    nccl: bool = False


@dataclass(frozen=True)
class DirectPayload:
    handoff_id: str
    sender_key: str  # the sending transport, found in its process by `local_sender`
    sender: Placement
    control: tuple[str, int]  # the sender's control channel (host, port)
    actor: Any | None  # the sending replica's Ray actor handle (None outside Ray)
    layout: ContextsLayout
    ipc: tuple[tuple[Any, tuple], ...] | None  # a CUDA IPC handle per context tensor
    send_s: float

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes


@dataclass(frozen=True)
class Route:
    name: str  # local | cuda_ipc | nccl | fetch
    reason: str


def plan_route(routes: frozenset[str], sender: Placement, receiver: Placement, *, local: bool, has_ipc: bool) -> Route:
    """The route of one handoff (the table in the module docstring), with the reason."""
    if local:
        return Route("local", "the sender is this process")
    if sender.gpu is None:
        return Route("fetch", "the contexts are in the sender's host memory")
    if receiver.gpu is None:
        return Route("fetch", "the receiver is not on a GPU")
    why_not = []
    if "cuda_ipc" in routes:
        if sender.node != receiver.node:
            why_not.append("CUDA IPC: the sender is on another node")
        elif sender.gpu not in receiver.visible:
            why_not.append("CUDA IPC: the sender's GPU is not visible here")
        elif not has_ipc:
            why_not.append("CUDA IPC: the payload carries no IPC handles")
        else:
            return Route("cuda_ipc", "the sender's GPU is visible here")
    if "nccl" in routes:
        if sender.gpu == receiver.gpu:
            why_not.append("NCCL: both sides are on the same GPU")
        elif not sender.nccl:
            why_not.append("NCCL: unavailable at the sender")
        elif not receiver.nccl:
            why_not.append("NCCL: unavailable here")
        else:
            return Route("nccl", "the sides are on different GPUs with NCCL")
    return Route("fetch", "; ".join(why_not) or "no GPU route is enabled")
