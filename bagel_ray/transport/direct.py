"""GPU-direct KV handoff: the sender keeps its contexts on its GPU, the receiver pulls them.

`send` puts the context tensors (one per context, every layer in it, as the engines make
them: no packing copy) in the sender's outbox and returns a small payload: the layout, a
handoff id, where the sender is (node, GPU UUID, whether it has NCCL), the address of its
control channel (`control.py`: how a receiver asks for a transfer and releases a handoff),
its Ray actor handle (for the object-store fallback), and CUDA IPC handles of the tensors. `receive` picks a route from the payload and its own
place (`plan_route`, the whole decision table):

| route      | when                                                   | how                               |
|------------|--------------------------------------------------------|-----------------------------------|
| `local`    | the sender is this process                             | the tensors themselves            |
| `cuda_ipc` | same node and the sender's GPU is visible here (UUID)  | map the sender's memory, one D2D copy |
| `nccl`     | both on GPUs with NCCL, not the same GPU (any node)    | a two-rank communicator per pair  |
| `fetch`    | anything else, or a GPU route that failed              | the sender packs to host, Ray object store |

`cuda_ipc` and `nccl` allow only their own GPU route, `auto` both (IPC first: it is a copy on
the same card); each falls back to `fetch`, with a warning that says why. Ray gives each
replica its own CUDA_VISIBLE_DEVICES, so in a cluster `cuda_ipc` is the route of replicas
that share a GPU and `nccl` that of replicas on different GPUs, on one node or several.

NCCL communicators are made lazily, one per (sender replica, receiver replica) pair, with a
unique id the receiver makes and passes in its first "send" request; both sides wait with
deadlines, and a failure or a timeout aborts the pair's communicator (the next handoff makes
a new one) and sends this handoff through the object store. Pairs unused for `link_idle_s`
are aborted; so is everything when the transport closes or is collected with its replica.
A handoff the sender no longer has (too old, evicted, sender gone) raises `HandoffGone`,
which the driver retries like a replica that died: nothing here waits without a deadline.

A NCCL handoff starts when both sides have posted, and on an idle pair the posts, not the
link, were the slow part: a thread that has just woken ran its allocation and NCCL call at
a third to half its warm speed. Two things take work off that path. The sender's control
channel polls for the request for `request_spin_s` after each send instead of sleeping
(`ControlServer.expect`); the receiver, while a transfer runs, makes the buffer of the next
one (`spare_buffers`; one spare per receiver, the size of its last context, used when the
next one fits it and it is at most a quarter bigger: that much more memory on the receiver's
GPU, and none when there is no room for it). In same-host comparisons on 2x H200 they took a
500 MB handoff from 2.00-2.17 to 1.90-2.11 ms (benchmarks/RESULTS.md, "KV handoff").

Host contexts (a CPU Thinker) are pushed through the object store at once, as
`object_store` does; `pull_host_contexts` keeps them in the outbox instead (the pull path of
GPU contexts with no direct route, exercised on CPU by the tests).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from bagel_ray.engine.kv_context import ImageContexts
from bagel_ray.transport import cuda
from bagel_ray.transport.base import KVTransport, TransferStats
from bagel_ray.transport.control import ControlClient, ControlError, ControlServer
from bagel_ray.transport.errors import HandoffGone
from bagel_ray.transport.layout import ContextsLayout
from bagel_ray.transport.nccl import CommFactory, Communicator, NcclComms, TransferTimeout, await_progress
from bagel_ray.transport.object_store import PackedContexts, pack, packed, unpacked
from bagel_ray.transport.outbox import Outbox, Parcel

log = logging.getLogger(__name__)

GPU_ROUTES = ("cuda_ipc", "nccl")
SENDER_RANK, RECEIVER_RANK = 0, 1
STARTED = "started"
GONE = "gone"


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


class PeerRefused(RuntimeError):
    """The sender answered but would not send (no NCCL there, or it dropped the pair's
    communicator); the handoff goes through the object store."""


# Senders of this process by key: how a call run in this process through Ray
# (`ray_peer`) finds its transport. Weak: a transport leaves with its replica.
_SENDERS: weakref.WeakValueDictionary[str, "DirectTransport"] = weakref.WeakValueDictionary()


def local_sender(key: str) -> "DirectTransport | None":
    return _SENDERS.get(key)


@dataclass
class _Link:
    """A pair's NCCL communicator, and the key both sides know it by."""

    comm: Communicator
    key: str
    last_used: float = field(default_factory=time.monotonic)


def _abort_all(*tables: dict[str, _Link]) -> None:
    for table in tables:
        links = list(table.values())
        table.clear()
        for link in links:
            link.comm.abort()


class DirectTransport(KVTransport):
    """See the module docstring. Subclasses choose the GPU routes (`routes`)."""

    name = "direct"
    routes: ClassVar[frozenset[str]] = frozenset(GPU_ROUTES)
    crosses_processes = True
    crosses_nodes = True

    def __init__(self, *, outbox_bytes: int = 8 << 30, outbox_ttl_s: float = 600.0, connect_timeout_s: float = 30.0,
                 transfer_timeout_s: float = 10.0, reply_timeout_s: float = 5.0, fetch_timeout_s: float = 120.0,
                 link_idle_s: float = 900.0, request_spin_s: float = 0.02, spare_buffers: bool = True,
                 pull_host_contexts: bool = False, comms: CommFactory | None = None,
                 placement: Callable[[torch.device], Placement] | None = None) -> None:
        """`outbox_bytes`, `outbox_ttl_s`: what the sender keeps for receivers to pull.
        Deadlines: `connect_timeout_s` (added to a pair's first handoff: NCCL init),
        `transfer_timeout_s` (each NCCL handoff), `reply_timeout_s` (the sender's answer to
        "send me this", which a live sender gives at once: Ray may take a minute to call a
        dead replica dead), `fetch_timeout_s` (the object-store fallback). `link_idle_s`: a
        pair's communicator unused this long is aborted. `request_spin_s`: after a send, how
        long the sender's control channel polls for the receiver's request rather than sleep
        (0: never). `spare_buffers`: a receiver makes the next handoff's receive buffer while
        a transfer runs. `comms` and `placement` replace NCCL and this process's own placement
        (tests)."""
        self.key = uuid.uuid4().hex
        self.outbox = Outbox(outbox_bytes, outbox_ttl_s)
        self.connect_timeout_s = connect_timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        self.reply_timeout_s = reply_timeout_s
        self.fetch_timeout_s = fetch_timeout_s
        self.link_idle_s = link_idle_s
        self.request_spin_s = request_spin_s
        self.spare_buffers = spare_buffers
        self.pull_host_contexts = pull_host_contexts
        self._comms: CommFactory = comms if comms is not None else NcclComms()
        self._placement = placement
        self._recv_links: dict[str, _Link] = {}  # by sender key
        self._send_links: dict[str, _Link] = {}  # by receiver key
        self._links_lock = threading.Lock()
        self._peer_locks: dict[tuple[str, str], threading.Lock] = {}
        self._senders: ThreadPoolExecutor | None = None
        self._control: ControlServer | None = None  # made with the first pull-able payload
        self._actor: Any | None = None  # this replica's Ray actor handle (fetches come through it)
        self._clients: dict[str, ControlClient] = {}  # by sender key
        self._unreachable: set[str] = set()  # senders whose control channel refused or timed out a connection
        self._places: dict[torch.device, Placement] = {}
        self._spare: torch.Tensor | None = None  # bytes for the next NCCL receive, made during the last
        self._warned: set[tuple[str, str]] = set()
        self.send_marks: dict[str, float] = {}  # when the last send request came and its send was posted (benchmarks)
        _SENDERS[self.key] = self
        # Communicators die with the transport; at interpreter exit the process takes them.
        weakref.finalize(self, _abort_all, self._recv_links, self._send_links).atexit = False

    # -- identity -------------------------------------------------------------------------

    def placement(self, device: torch.device) -> Placement:
        if self._placement is not None:
            return self._placement(device)
        if device not in self._places:  # fixed for the life of the process
            from bagel_ray.transport import ray_peer

            gpu = cuda.gpu_uuid(device) if device.type == "cuda" else None
            self._places[device] = Placement(ray_peer.node_id(), gpu, cuda.visible_gpus(),
                                             gpu is not None and self._comms.available)
        return self._places[device]

    def _control_address(self) -> tuple[str, int]:
        with self._links_lock:
            if self._control is None:
                from bagel_ray.transport import ray_peer

                self._control = ControlServer(self.key, self._on_control, ray_peer.node_address())
                self._actor = ray_peer.current_actor()  # this replica, for the object-store fallback
            return self._control.address

    def _on_control(self, message: dict[str, Any], answer: Callable[[dict[str, Any]], None]) -> None:
        """A receiver's message on the control channel (run in the channel's thread)."""
        if message.get("op") == "send":
            self.send_marks = {"request": time.perf_counter()}
            uid = message.get("unique_id")
            self.serve_send(message["handoff"], message["receiver"], message["comm"], bytes.fromhex(uid) if uid else None,
                            float(message["timeout_s"]), answer)
        elif message.get("op") == "release":
            self.serve_release(message["handoff"])

    # -- sending --------------------------------------------------------------------------

    def send(self, contexts: ImageContexts) -> DirectPayload | PackedContexts:
        t0 = time.perf_counter()
        tensors = ContextsLayout.tensors(contexts)
        device = tensors[0].device
        if device.type != "cuda" and not self.pull_host_contexts:
            return packed(contexts)
        if device.type == "cuda":
            # Whoever reads the tensors (IPC, NCCL's stream, a fetch) reads finished data.
            torch.cuda.current_stream(device).synchronize()
        layout = ContextsLayout.of(contexts)
        handoff_id = uuid.uuid4().hex
        control = self._control_address()
        self.outbox.put(handoff_id, tensors, layout)
        if self.request_spin_s > 0 and device.type == "cuda" and self._send_links:  # NCCL receivers ask
            self._control.expect(self.request_spin_s)
        ipc = tuple(cuda.export_ipc(t) for t in tensors) if device.type == "cuda" and "cuda_ipc" in self.routes else None
        return DirectPayload(handoff_id, self.key, self.placement(device), control, self._actor, layout, ipc,
                             time.perf_counter() - t0)

    # What a receiver's requests run here, in the sender's process (through the control
    # channel, or `ray_peer` for the fetch).

    def serve_send(self, handoff_id: str, receiver_key: str, comm_key: str, unique_id: bytes | None,
                   timeout_s: float, answer: Callable[[dict[str, Any]], None]) -> None:
        """Answer a receiver's "send me this handoff" (`started`, `gone`, or why not), and send
        it. A pair's first handoff (with a `unique_id`: a new communicator, whose connect takes
        a while) is answered at once and sent from a worker thread; later ones right here, in
        the pair's control thread, where the send is posted before the answer goes out: the
        receiver has posted its receive already, so the transfer starts with the post."""
        parcel = self.outbox.peek(handoff_id)
        if parcel is None:
            status = GONE
        elif not self._comms.available:
            status = f"NCCL is unavailable at the sender: {self._comms.unavailable_reason}"
        elif unique_id is None and getattr(self._send_links.get(receiver_key), "key", None) != comm_key:
            status = "the sender no longer has this pair's communicator"
        else:
            status = STARTED
        if status != STARTED:
            answer({"status": status})
            return
        deadline = time.monotonic() + timeout_s
        if unique_id is None:
            self._send_job(handoff_id, parcel, receiver_key, comm_key, None, deadline, answer)
        else:
            answer({"status": status})
            if self._senders is None:
                self._senders = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kv-send")
            self._senders.submit(self._send_job, handoff_id, parcel, receiver_key, comm_key, unique_id, deadline)
        self._sweep_links()

    def _send_job(self, handoff_id: str, parcel: Parcel, receiver_key: str, comm_key: str, unique_id: bytes | None,
                  deadline: float, answer: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Send a parcel on the pair's communicator (made here from `unique_id` for a pair's
        first handoff). `answer`, when given, is told `started` once the first send is posted,
        or why it could not be."""
        link = None
        try:
            with self._peer_lock("send", receiver_key, deadline):
                if unique_id is not None:
                    self._drop_link(self._send_links, receiver_key)  # an older communicator of this pair
                    link = _Link(self._comms.open(unique_id, 2, SENDER_RANK, parcel.tensors[0].device), comm_key)
                    with self._links_lock:
                        self._send_links[receiver_key] = link
                    await_progress(link.comm, deadline, what="NCCL connect")
                else:
                    with self._links_lock:
                        link = self._send_links.get(receiver_key)
                    if link is None or link.key != comm_key:
                        raise PeerRefused("the pair's communicator was dropped")
                for t in parcel.tensors:
                    link.comm.send(t, RECEIVER_RANK)
                    if answer is not None:
                        self.send_marks["posted"] = time.perf_counter()
                        reply, answer = answer, None
                        reply({"status": STARTED})
                    await_progress(link.comm, deadline, what="NCCL send")
                link.last_used = time.monotonic()
            # Sent: the receiver has it (a receiver that failed at the very end finds it gone and
            # the request is retried), so no release message is needed on this route.
            self.outbox.take(handoff_id)
        except Exception as exc:  # the receiver times out too and takes the object store
            if answer is not None:  # nothing was posted: say why, and the receiver takes the object store now
                answer({"status": f"the send failed at the sender: {type(exc).__name__}: {exc}"})
            log.warning("KV handoff %s: NCCL send to receiver %s failed (%s: %s); communicator dropped",
                        handoff_id, receiver_key[:8], type(exc).__name__, exc)
            if link is not None:
                self._drop_link(self._send_links, receiver_key, link)

    def serve_fetch(self, handoff_id: str) -> PackedContexts | None:
        """The parcel packed into host memory (for the object store), taken out of the outbox."""
        parcel = self.outbox.take(handoff_id)
        if parcel is None:
            return None
        t0 = time.perf_counter()
        return PackedContexts(pack(list(parcel.tensors)), parcel.layout, time.perf_counter() - t0)

    def serve_release(self, handoff_id: str) -> None:
        self.outbox.take(handoff_id)

    # -- receiving ------------------------------------------------------------------------

    def receive(self, payload: DirectPayload | PackedContexts, device: torch.device) -> tuple[ImageContexts, TransferStats]:
        t0 = time.perf_counter()
        device = cuda.resolve(device)
        if isinstance(payload, PackedContexts):
            contexts = unpacked(payload, device)
            return contexts, TransferStats(payload.buffer.nbytes, payload.send_s, time.perf_counter() - t0, "object_store")
        local = local_sender(payload.sender_key)
        if local is None and payload.actor is None:
            raise RuntimeError(f"KV handoff {payload.handoff_id} comes from a process that is neither this one nor a "
                               "Ray actor: nothing can pull it")
        here = self.placement(device)
        route = plan_route(self.routes, payload.sender, here, local=local is not None, has_ipc=payload.ipc is not None)
        if route.name in GPU_ROUTES and payload.sender_key in self._unreachable:
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
        self._sweep_links()
        return contexts, TransferStats(payload.nbytes, payload.send_s, time.perf_counter() - t0, route.name, phases)

    def _client(self, payload: DirectPayload) -> ControlClient:
        """The connection to the payload's sender, made on first use and kept."""
        with self._links_lock:
            client = self._clients.get(payload.sender_key)
        if client is None:
            try:
                client = ControlClient(payload.control, payload.sender_key, self.reply_timeout_s)
            except ControlError:  # a firewall, say: every later handoff from it takes the object store at once
                self._unreachable.add(payload.sender_key)
                raise
            with self._links_lock:
                kept = self._clients.setdefault(payload.sender_key, client)
            if kept is not client:  # another thread connected first
                client.close()
                client = kept
        return client

    def _drop_client(self, sender_key: str) -> None:
        with self._links_lock:
            client = self._clients.pop(sender_key, None)
        if client is not None:
            client.close()

    def _release(self, payload: DirectPayload) -> None:
        """Tell the sender it may let go of the handoff; a parcel nobody releases leaves the
        outbox by age, so a failure here costs nothing but memory for a while."""
        try:
            self._client(payload).notify({"op": "release", "handoff": payload.handoff_id})
        except ControlError as exc:
            log.debug("KV handoff %s: release not delivered (%s)", payload.handoff_id, exc)
            self._drop_client(payload.sender_key)

    def _take_local(self, sender: "DirectTransport", payload: DirectPayload, device: torch.device) -> list[torch.Tensor]:
        parcel = sender.outbox.take(payload.handoff_id)
        if parcel is None:
            raise HandoffGone(f"KV handoff {payload.handoff_id} is gone from its sender (too old, or its outbox was full)")
        return [t if t.device == device else t.to(device) for t in parcel.tensors]

    def _via_ipc(self, payload: DirectPayload, here: Placement, device: torch.device) -> list[torch.Tensor]:
        index = here.visible.index(payload.sender.gpu)
        stream = torch.cuda.Stream(device)
        received, mapped = [], []
        with torch.cuda.stream(stream):
            for handle, target in zip(payload.ipc, payload.layout.empty(device)):
                mapped.append(cuda.open_ipc(handle, index))
                target.copy_(mapped[-1], non_blocking=True)
                received.append(target)
        stream.synchronize()
        del mapped  # unmap before telling the sender it may let go
        self._handed_over(received, device)
        self._release(payload)
        return received

    def _via_nccl(self, payload: DirectPayload, device: torch.device, t0: float) -> tuple[list[torch.Tensor], tuple]:
        """The payload's tensors, and the seconds of each phase from `t0` (when `receive` was
        called): plan (route and pair), ask (the request sent), alloc (the receive buffers
        made), post (the receive posted), answer (the sender's answer read), transfer, and
        handover (to the engine's stream)."""
        sender_key, handoff_id = payload.sender_key, payload.handoff_id
        connect_s = self.connect_timeout_s + self.transfer_timeout_s
        with self._peer_lock("recv", sender_key, time.monotonic() + connect_s):
            with self._links_lock:
                link = self._recv_links.get(sender_key)
            fresh = link is None
            deadline = time.monotonic() + (connect_s if fresh else self.transfer_timeout_s)
            comm_key = uuid.uuid4().hex if fresh else link.key
            unique_id = self._comms.unique_id() if fresh else None
            marks = [("start", t0), ("plan", time.perf_counter())]  # t0: `receive` was called
            # Whatever goes wrong from here leaves the pair out of step (a receive or a send may be
            # posted): its communicator is dropped, and with a failed channel the connection too.
            try:
                client = self._client(payload)
                client.notify({"op": "send", "handoff": handoff_id, "receiver": self.key, "comm": comm_key,
                               "unique_id": unique_id.hex() if unique_id else None,
                               "timeout_s": deadline - time.monotonic()})
                marks.append(("ask", time.perf_counter()))
                if not fresh:  # post the receive while the request travels: the sender's send meets it
                    received = self._receive_buffers(link, payload, device)
                    marks.append(("alloc", time.perf_counter()))
                    link.comm.recv(received[0], SENDER_RANK)
                    marks.append(("post", time.perf_counter()))
                    if self.spare_buffers:  # while the transfer runs
                        self._make_spare(link, payload.nbytes, device)
                status = client.answer(min(self.reply_timeout_s, deadline - time.monotonic())).get("status")
                marks.append(("answer", time.perf_counter()))
                if status == GONE:
                    raise HandoffGone(f"KV handoff {handoff_id} is gone from its sender (too old, or its outbox was full)")
                if status != STARTED:
                    raise PeerRefused(str(status))

                def check() -> None:
                    if client.closed():
                        raise ControlError("the sender closed its control connection during the transfer")

                if fresh:
                    link = _Link(self._comms.open(unique_id, 2, RECEIVER_RANK, device), comm_key)
                    with self._links_lock:
                        self._recv_links[sender_key] = link
                    await_progress(link.comm, deadline, check, what="NCCL connect")
                    received = self._receive_buffers(link, payload, device)
                    link.comm.recv(received[0], SENDER_RANK)
                await_progress(link.comm, deadline, check, what="NCCL receive")
                for t in received[1:]:  # img2img's own cfg_img context
                    link.comm.recv(t, SENDER_RANK)
                    await_progress(link.comm, deadline, check, what="NCCL receive")
                marks.append(("transfer", time.perf_counter()))
            except BaseException as exc:
                if link is not None:
                    self._drop_link(self._recv_links, sender_key, link)
                if isinstance(exc, ControlError):
                    self._drop_client(sender_key)
                raise
            link.last_used = time.monotonic()
        self._handed_over(received, device)  # no release: the sender let go when its send was done
        marks.append(("handover", time.perf_counter()))
        return received, tuple((name, t - marks[i][1]) for i, (name, t) in enumerate(marks[1:]))

    def _receive_buffers(self, link: _Link, payload: DirectPayload, device: torch.device) -> list[torch.Tensor]:
        """Empty tensors for the payload's contexts: the spare buffer when it fits (up to a
        quarter bigger), else new ones. Whichever pair made the spare, any may fill it: it
        is nobody else's memory until then, and NCCL is done with it before the engine reads."""
        with self._links_lock:
            spare, self._spare = self._spare, None
        if spare is not None and spare.device == device and payload.nbytes <= spare.numel() <= payload.nbytes * 5 // 4:
            return payload.layout.views(spare)
        del spare
        return payload.layout.views(self._buffer(link, payload.nbytes, device))

    def _make_spare(self, link: _Link, nbytes: int, device: torch.device) -> None:
        """The next receive's buffer, if there is room for it: without one, that receive
        allocates its own, as it would anyway."""
        try:
            spare = self._buffer(link, nbytes, device)
        except torch.OutOfMemoryError:
            log.debug("KV transport: no room for a spare receive buffer of %d bytes", nbytes)
            return
        with self._links_lock:
            self._spare = spare

    @staticmethod
    def _buffer(link: _Link, nbytes: int, device: torch.device) -> torch.Tensor:
        """Flat bytes in the memory of the communicator's stream (NCCL writes them there)."""
        with torch.cuda.stream(link.comm.stream) if link.comm.stream is not None else nullcontext():
            return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def _fetch(self, payload: DirectPayload, device: torch.device) -> ImageContexts:
        from ray.exceptions import GetTimeoutError

        from bagel_ray.transport.ray_peer import fetch

        try:
            packed_contexts = fetch(payload.actor, payload.sender_key, payload.handoff_id, self.fetch_timeout_s)
        except GetTimeoutError:
            raise HandoffGone(f"the sender of KV handoff {payload.handoff_id} did not hand it over within "
                              f"{self.fetch_timeout_s:.0f}s") from None
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

    # -- pairs ----------------------------------------------------------------------------

    @contextmanager
    def _peer_lock(self, side: str, key: str, deadline: float) -> Iterator[None]:
        """One handoff at a time per pair and side: both sides post their operations in the
        same order, and a pair's communicator is made or dropped by one thread."""
        with self._links_lock:
            lock = self._peer_locks.setdefault((side, key), threading.Lock())
        if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TransferTimeout(f"another handoff with peer {key[:8]} held the pair past the deadline")
        try:
            yield
        finally:
            lock.release()

    def _drop_link(self, table: dict[str, _Link], key: str, link: _Link | None = None) -> None:
        """Abort `link` (or whatever `key` has) and remove it from `table` if it is there."""
        with self._links_lock:
            current = table.get(key)
            if current is not None and (link is None or current is link):
                del table[key]
                link = current
        if link is not None:
            link.comm.abort()

    def _sweep_links(self) -> None:
        now = time.monotonic()
        for side, table in (("recv", self._recv_links), ("send", self._send_links)):
            with self._links_lock:
                idle = [(k, link) for k, link in table.items() if now - link.last_used > self.link_idle_s]
            for key, link in idle:
                lock = self._peer_locks.get((side, key))
                if lock is not None and not lock.acquire(blocking=False):
                    continue  # in use
                try:
                    log.info("KV transport: dropping the NCCL communicator with %s %s, idle %.0fs",
                             "sender" if side == "recv" else "receiver", key[:8], now - link.last_used)
                    self._drop_link(table, key, link)
                finally:
                    if lock is not None:
                        lock.release()

    def _warn_once(self, key: str, message: str) -> None:
        if (key, message) in self._warned:
            log.debug("%s", message)
        else:
            self._warned.add((key, message))
            log.warning("%s", message)

    def close(self) -> None:
        _SENDERS.pop(self.key, None)
        _abort_all(self._recv_links, self._send_links)
        self.outbox.clear()
        if self._control is not None:
            self._control.close()
        for key in list(self._clients):
            self._drop_client(key)
        if self._senders is not None:
            self._senders.shutdown(wait=False, cancel_futures=True)


class AutoTransport(DirectTransport):
    """The fastest route that works for each pair: CUDA IPC, else NCCL, else the object store."""

    name = "auto"
    routes = frozenset(GPU_ROUTES)


class CudaIpcTransport(DirectTransport):
    name = "cuda_ipc"
    routes = frozenset({"cuda_ipc"})
    needs_cuda = True


class NcclTransport(DirectTransport):
    name = "nccl"
    routes = frozenset({"nccl"})
    needs_cuda = True
