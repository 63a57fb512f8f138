"""The receiving side of the GPU-direct transport: it plans each handoff's route
(`routes.plan_route`) and pulls the contexts that way (see `direct.py` for the whole protocol).

`local`: the sender is in this process, its tensors are taken. `cuda_ipc`: the sender's memory
is mapped and copied once, then released. `nccl`: the receiver asks the sender over its control
channel and receives on the pair's communicator (made by the pair's first handoff), making the
next handoff's buffer while a transfer runs. `fetch`: the sender packs the contexts into host
memory and they come through the Ray object store (`ray_peer.fetch`). A GPU route that fails
falls back to `fetch`, with a warning that says why.

`share` is a worker rank's receive of a several-rank DiT replica: only the pieces its branches
cover (`ContextsLayout.piece`), over CUDA IPC or over its own NCCL pair with the sender, and
None where neither reaches it (rank 0, which received the whole handoff and had the sender keep
it, `hold`, relays it then).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch

from bagel_ray.engine.kv_context import ImageContexts, KVContext
from bagel_ray.transport import cuda
from bagel_ray.transport.base import TransferStats
from bagel_ray.transport.control import ControlClient, ControlError
from bagel_ray.transport.errors import HandoffGone
from bagel_ray.transport.links import RECEIVER_RANK, SENDER_RANK, Link, Links, PeerRefused
from bagel_ray.transport.nccl import CommFactory, await_progress
from bagel_ray.transport.object_store import PackedContexts, StoredContexts, received, unpacked
from bagel_ray.transport.routes import GPU_ROUTES, DirectPayload, Placement, Route, plan_route
from bagel_ray.transport.sender import GONE, STARTED, Piece, Sender, local_sender

if TYPE_CHECKING:  # direct.py composes this module with sender.py
    from bagel_ray.transport.direct import DirectSettings

log = logging.getLogger(__name__)

Fetch = Callable[[Any, str, str, float], PackedContexts | None]  # (actor, sender key, handoff id, timeout)


class Receiver:
    def __init__(self, key: str, routes: frozenset[str], comms: CommFactory,
                 placement: Callable[[torch.device], Placement], fetch: Fetch, settings: DirectSettings, *,
                 hold: bool = False) -> None:
        """`fetch` pulls a handoff through the object store from the sender's actor (it raises
        `TimeoutError` past its timeout). `settings`: its deadlines, `link_idle_s` and
        `spare_buffers` apply here. `hold`: a handoff received over CUDA IPC or NCCL stays
        with the sender (the other ranks of this DiT replica take their shares of it too)
        until `release`, once they have."""
        self.key = key
        self.routes = routes
        self.links = Links("recv")  # by sender key
        self.settings = settings
        self.hold = hold
        self.held: set[str] = set()  # handoffs received and kept at the sender, not yet released (`hold`)
        self._comms = comms
        self._placement = placement
        self._fetch_from = fetch
        self._lock = threading.Lock()
        self.clients: dict[str, ControlClient] = {}  # by sender key
        self.unreachable: set[str] = set()  # senders whose control channel refused or timed out a connection
        self.spare: torch.Tensor | None = None  # bytes for the next NCCL receive, made during the last
        self._warned: set[tuple[str, str]] = set()

    def receive(self, payload: DirectPayload | PackedContexts | StoredContexts,
                device: torch.device) -> tuple[ImageContexts, TransferStats]:
        t0 = time.perf_counter()
        device = cuda.resolve(device)
        if isinstance(payload, (PackedContexts, StoredContexts)):
            contexts, nbytes = received(payload, device)
            return contexts, TransferStats(nbytes, payload.send_s, time.perf_counter() - t0, "object_store")
        local = local_sender(payload.sender_key)
        if local is None and payload.actor is None:
            raise RuntimeError(f"KV handoff {payload.handoff_id} comes from a process that is neither this one nor a "
                               "Ray actor: nothing can pull it")
        here = self._placement(device)
        route = plan_route(self.routes, payload.sender, here, local=local is not None, has_ipc=payload.ipc is not None)
        if route.name in GPU_ROUTES and payload.sender_key in self.unreachable:
            route = Route("fetch", "the sender's control channel could not be reached")
        if route.name == "fetch" and payload.sender.gpu is not None:
            self._warn_once(payload.sender_key, f"KV handoffs from sender {payload.sender_key[:8]} go through the "
                            f"object store: {route.reason}")
        tensors: list[torch.Tensor] | None = None
        phases: tuple[tuple[str, float], ...] = ()
        if route.name == "local":
            tensors = self._take_local(local, payload, device)
        elif route.name in GPU_ROUTES:
            try:
                if route.name == "cuda_ipc":
                    tensors = self._via_ipc(payload, here, device)
                else:
                    tensors, phases = self._via_nccl(payload, device, t0)
            except HandoffGone:
                raise
            except Exception as exc:
                log.warning("KV handoff %s over %s failed (%s: %s); pulling it through the object store",
                            payload.handoff_id, route.name, type(exc).__name__, exc)
                route = Route("fetch", f"{route.name} failed")
        contexts = payload.layout.assemble(tensors) if tensors is not None else self._fetch(payload, device)
        self.links.sweep(self.settings.link_idle_s)
        return contexts, TransferStats(payload.nbytes, payload.send_s, time.perf_counter() - t0, route.name, phases)

    def _client(self, payload: DirectPayload) -> ControlClient:
        """The connection to the payload's sender, made on first use and kept."""
        with self._lock:
            client = self.clients.get(payload.sender_key)
        if client is None:
            try:
                client = ControlClient(payload.control, payload.sender_key, self.settings.reply_timeout_s)
            except ControlError:  # a firewall, say: every later handoff from it takes the object store at once
                self.unreachable.add(payload.sender_key)
                raise
            with self._lock:
                kept = self.clients.setdefault(payload.sender_key, client)
            if kept is not client:  # another thread connected first
                client.close()
                client = kept
        return client

    def _drop_client(self, sender_key: str) -> None:
        with self._lock:
            client = self.clients.pop(sender_key, None)
        if client is not None:
            client.close()

    def release(self, payload: DirectPayload) -> None:
        """With `hold`: every rank holds its share of a handoff received whole here, the sender
        may let go of it (a handoff not held here is let go already: nothing to do)."""
        with self._lock:
            held = payload.handoff_id in self.held
            self.held.discard(payload.handoff_id)
        if held:
            self._release(payload)

    def _release(self, payload: DirectPayload) -> None:
        """Tell the sender it may let go of the handoff; a parcel nobody releases leaves the
        outbox by age, so a failure here costs nothing but memory for a while."""
        try:
            self._client(payload).notify({"op": "release", "handoff": payload.handoff_id})
        except ControlError as exc:
            log.debug("KV handoff %s: release not delivered (%s)", payload.handoff_id, exc)
            self._drop_client(payload.sender_key)

    def _take_local(self, sender: Sender, payload: DirectPayload, device: torch.device) -> list[torch.Tensor]:
        parcel = sender.outbox.take(payload.handoff_id)
        if parcel is None:
            raise HandoffGone(f"KV handoff {payload.handoff_id} is gone from its sender (too old, or its outbox was full)")
        return [t if t.device == device else t.to(device) for t in parcel.tensors]

    def _via_ipc(self, payload: DirectPayload, here: Placement, device: torch.device,
                 pieces: list[Piece] | None = None) -> list[torch.Tensor]:
        """Map the sender's context tensors and copy them (or only `pieces` of them, a worker
        rank's share) here, one D2D copy each. A whole handoff is then released, or held
        (`hold`); pieces never are: rank 0 releases the handoff once every rank holds its share."""
        index = here.visible.index(payload.sender.gpu)
        stream = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            mapped = [cuda.open_ipc(handle, index) for handle in payload.ipc]
            sources = mapped if pieces is None else [payload.layout.piece(mapped, *piece)[0] for piece in pieces]
            received = []
            for source in sources:
                received.append(torch.empty(source.shape, dtype=source.dtype, device=device))
                received[-1].copy_(source, non_blocking=True)
        stream.synchronize()
        del mapped, sources  # unmapped before the sender is told it may let go
        self._handed_over(received, device)
        if pieces is None:
            if self.hold:
                self._hold(payload)
            else:
                self._release(payload)
        return received

    def _hold(self, payload: DirectPayload) -> None:
        with self._lock:
            self.held.add(payload.handoff_id)

    def share(self, payload: DirectPayload, wants: dict[str, tuple[int, int]], device: torch.device,
              dtype: torch.dtype) -> tuple[dict[str, KVContext], TransferStats] | None:
        """A worker rank's share of `payload`: branch -> (KV head group, of how many groups),
        in `dtype` on `device`, with the bytes this rank got and the route; None where no GPU
        route reaches this process (rank 0 relays it). Nothing is released here: rank 0 does,
        once every rank holds its share. Raises what the route raises (a failed pull, a
        handoff gone): rank 0 relays then too."""
        t0 = time.perf_counter()
        device = cuda.resolve(device)
        if payload.actor is None or local_sender(payload.sender_key) is not None:
            return None
        here = self._placement(device)
        route = plan_route(self.routes, payload.sender, here, local=False, has_ipc=payload.ipc is not None)
        if route.name not in GPU_ROUTES or payload.sender_key in self.unreachable:
            return None
        pieces = [(b, g, n) for b, (g, n) in wants.items()]
        phases: tuple[tuple[str, float], ...] = ()
        if route.name == "cuda_ipc":
            tensors = self._via_ipc(payload, here, device, pieces)
        else:
            tensors, phases = self._via_nccl(payload, device, t0, pieces)
        out = {b: KVContext(t.to(dtype), payload.layout.region(b)[2]) for (b, _, _), t in zip(pieces, tensors)}
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        return out, TransferStats(nbytes, payload.send_s, time.perf_counter() - t0, route.name, phases)

    def _via_nccl(self, payload: DirectPayload, device: torch.device, t0: float,
                  pieces: list[Piece] | None = None) -> tuple[list[torch.Tensor], tuple]:
        """The payload's tensors (or its `pieces`, a worker rank's share), and the seconds of
        each phase from `t0` (when `receive` was called): plan (route and pair), ask (the
        request sent), alloc (the receive buffers made), post (the receive posted), answer (the
        sender's answer read), transfer, and handover (to the engine's stream). With `hold`, a
        whole handoff stays with the sender until `release`."""
        sender_key, handoff_id = payload.sender_key, payload.handoff_id
        connect_s = self.settings.connect_timeout_s + self.settings.transfer_timeout_s
        with self.links.pair(sender_key, time.monotonic() + connect_s):
            link = self.links.get(sender_key)
            fresh = link is None
            deadline = time.monotonic() + (connect_s if fresh else self.settings.transfer_timeout_s)
            comm_key = uuid.uuid4().hex if fresh else link.key
            unique_id = self._comms.unique_id() if fresh else None
            marks = [("start", t0), ("plan", time.perf_counter())]  # t0: `receive` was called
            # Whatever goes wrong from here leaves the pair out of step (a receive or a send may be
            # posted): its communicator is dropped, and with a failed channel the connection too.
            try:
                client = self._client(payload)
                client.notify({"op": "send", "handoff": handoff_id, "receiver": self.key, "comm": comm_key,
                               "unique_id": unique_id.hex() if unique_id else None,
                               "timeout_s": deadline - time.monotonic(), "pieces": pieces,
                               "keep": self.hold and pieces is None})
                marks.append(("ask", time.perf_counter()))
                if not fresh:  # post the receive while the request travels: the sender's send meets it
                    received = self.receive_buffers(link, payload, device, pieces)
                    marks.append(("alloc", time.perf_counter()))
                    link.comm.recv(received[0], SENDER_RANK)
                    marks.append(("post", time.perf_counter()))
                    if self.settings.spare_buffers and pieces is None:  # while the transfer runs
                        self.make_spare(link, payload.nbytes, device)
                status = client.answer(min(self.settings.reply_timeout_s, deadline - time.monotonic())).get("status")
                marks.append(("answer", time.perf_counter()))
                if status == GONE:
                    raise HandoffGone(f"KV handoff {handoff_id} is gone from its sender (too old, or its outbox was full)")
                if status != STARTED:
                    raise PeerRefused(str(status))

                def check() -> None:
                    if client.closed():
                        raise ControlError("the sender closed its control connection during the transfer")

                if fresh:
                    link = Link(self._comms.open(unique_id, 2, RECEIVER_RANK, device), comm_key)
                    self.links.put(sender_key, link)
                    await_progress(link.comm, deadline, check, what="NCCL connect")
                    received = self.receive_buffers(link, payload, device, pieces)
                    link.comm.recv(received[0], SENDER_RANK)
                await_progress(link.comm, deadline, check, what="NCCL receive")
                for t in received[1:]:  # img2img's own cfg_img context, the other pieces
                    link.comm.recv(t, SENDER_RANK)
                    await_progress(link.comm, deadline, check, what="NCCL receive")
                marks.append(("transfer", time.perf_counter()))
            except BaseException as exc:
                if link is not None:
                    self.links.drop(sender_key, link)
                if isinstance(exc, ControlError):
                    self._drop_client(sender_key)
                raise
            link.last_used = time.monotonic()
        if self.hold and pieces is None:
            self._hold(payload)
        self._handed_over(received, device)  # no release (unless held): the sender let go when its send was done
        marks.append(("handover", time.perf_counter()))
        return received, tuple((name, t - marks[i][1]) for i, (name, t) in enumerate(marks[1:]))

    def receive_buffers(self, link: Link, payload: DirectPayload, device: torch.device,
                        pieces: list[Piece] | None = None) -> list[torch.Tensor]:
        """Empty tensors for the payload's contexts: the spare buffer when it fits (up to a
        quarter bigger), else new ones. Whichever pair made the spare, any may fill it: it
        is nobody else's memory until then, and NCCL is done with it before the engine reads.
        With `pieces`, one new tensor per piece."""
        if pieces is not None:
            layout = payload.layout
            with torch.cuda.stream(link.comm.stream) if link.comm.stream is not None else nullcontext():
                return [torch.empty(layout.piece_shape(*piece), dtype=layout.torch_dtype, device=device)
                        for piece in pieces]
        with self._lock:
            spare, self.spare = self.spare, None
        if spare is not None and spare.device == device and payload.nbytes <= spare.numel() <= payload.nbytes * 5 // 4:
            return payload.layout.views(spare)
        del spare
        return payload.layout.views(self.buffer(link, payload.nbytes, device))

    def make_spare(self, link: Link, nbytes: int, device: torch.device) -> None:
        """The next receive's buffer, if there is room for it: without one, that receive
        allocates its own, as it would anyway."""
        try:
            spare = self.buffer(link, nbytes, device)
        except torch.OutOfMemoryError:
            log.debug("KV transport: no room for a spare receive buffer of %d bytes", nbytes)
            return
        with self._lock:
            self.spare = spare

    @staticmethod
    def buffer(link: Link, nbytes: int, device: torch.device) -> torch.Tensor:
        """Flat bytes in the memory of the communicator's stream (NCCL writes them there)."""
        with torch.cuda.stream(link.comm.stream) if link.comm.stream is not None else nullcontext():
            return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def _fetch(self, payload: DirectPayload, device: torch.device) -> ImageContexts:
        try:
            timeout_s = self.settings.fetch_timeout_s
            packed_contexts = self._fetch_from(payload.actor, payload.sender_key, payload.handoff_id, timeout_s)
        except TimeoutError:
            raise HandoffGone(f"the sender of KV handoff {payload.handoff_id} did not hand it over within "
                              f"{timeout_s:.0f}s") from None
        if packed_contexts is None:
            raise HandoffGone(f"KV handoff {payload.handoff_id} is gone from its sender (too old, or its outbox was full)")
        return unpacked(packed_contexts, device)

    @staticmethod
    def _handed_over(tensors: list[torch.Tensor], device: torch.device) -> None:
        """The received tensors were written on a side stream; the engines read them on the
        default stream, so their memory is not reused before that stream is done with it."""
        if device.type == "cuda":
            for t in tensors:
                t.record_stream(torch.cuda.default_stream(device))

    def _warn_once(self, key: str, message: str) -> None:
        if (key, message) in self._warned:
            log.debug("%s", message)
        else:
            self._warned.add((key, message))
            log.warning("%s", message)

    def close(self) -> None:
        self.links.abort_all()
        for key in list(self.clients):
            self._drop_client(key)
