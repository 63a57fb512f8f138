"""The sending side of the GPU-direct transport: it keeps its contexts and hands them over on
request (see `direct.py` for the whole protocol).

`send` puts the context tensors in the outbox and returns the payload that describes them. A
receiver's requests arrive on the sender's control channel (`control.py`): "send me this
handoff" is answered and sent over the pair's NCCL communicator (`serve_send`): the whole of
it, or a worker rank's share of it (pieces: branches' rows, KV head groups), "release" lets go
of a handoff the receiver mapped over CUDA IPC, or asked to be kept (a several-rank DiT replica's
rank 0, whose worker ranks pull their shares after it). The object-store fallback (`serve_fetch`) is
called in this process through Ray (`ray_peer`), which finds the sender by its key
(`local_sender`). Ray itself is not imported here: where the process is (its node address, its
actor handle) comes in as functions.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch

from bagel_ray.engine.kv_context import ImageContexts
from bagel_ray.transport import cuda
from bagel_ray.transport.control import ControlServer
from bagel_ray.transport.layout import ContextsLayout
from bagel_ray.transport.links import RECEIVER_RANK, SENDER_RANK, Link, Links, PeerRefused
from bagel_ray.transport.nccl import CommFactory, await_progress
from bagel_ray.transport.object_store import PackedContexts, StoredContexts, pack, packed, stored
from bagel_ray.transport.outbox import Outbox, Parcel
from bagel_ray.transport.routes import DirectPayload, Placement

if TYPE_CHECKING:  # direct.py composes this module with receiver.py
    from bagel_ray.transport.direct import DirectSettings

log = logging.getLogger(__name__)

STARTED = "started"
GONE = "gone"

Piece = tuple[str, int, int]  # (branch, KV head group, of how many groups): `ContextsLayout.piece`

# Senders of this process by key: how a call run in this process through Ray
# (`ray_peer`) finds its sender. Weak: a sender leaves with its replica.
_SENDERS: weakref.WeakValueDictionary[str, "Sender"] = weakref.WeakValueDictionary()


def local_sender(key: str) -> "Sender | None":
    return _SENDERS.get(key)


class Sender:
    def __init__(self, key: str, comms: CommFactory, placement: Callable[[torch.device], Placement],
                 node_address: Callable[[], str], current_actor: Callable[[], Any | None], settings: DirectSettings,
                 *, ipc: bool, ranks: int = 1) -> None:
        """`settings`: its outbox, `link_idle_s`, `request_spin_s` and `pull_host_contexts`
        apply here. `ipc`: payloads carry CUDA IPC handles. `ranks`: of the receiving DiT
        replica (host contexts go to one of several ranks by reference, `object_store.stored`).
        `node_address` and `current_actor` say where this process is (the control channel's
        address, the actor receivers fetch through)."""
        self.key = key
        self.settings = settings
        self.outbox = Outbox(settings.outbox_bytes, settings.outbox_ttl_s)
        self.links = Links("send")  # by receiver key
        self.ipc = ipc
        self.ranks = ranks
        self._comms = comms
        self._placement = placement
        self._node_address = node_address
        self._current_actor = current_actor
        self._control_lock = threading.Lock()
        self._control: ControlServer | None = None  # made with the first pull-able payload
        self._actor: Any | None = None  # this replica's Ray actor handle (fetches come through it)
        self._workers: ThreadPoolExecutor | None = None
        self.send_marks: dict[str, float] = {}  # when the last send request came and its send was posted (benchmarks)
        _SENDERS[key] = self

    def _control_address(self) -> tuple[str, int]:
        with self._control_lock:
            if self._control is None:
                self._control = ControlServer(self.key, self._on_control, self._node_address())
                self._actor = self._current_actor()  # this replica, for the object-store fallback
            return self._control.address

    def _on_control(self, message: dict[str, Any], answer: Callable[[dict[str, Any]], None]) -> None:
        """A receiver's message on the control channel (run in the channel's thread)."""
        if message.get("op") == "send":
            self.send_marks = {"request": time.perf_counter()}
            uid = message.get("unique_id")
            pieces = message.get("pieces")
            self.serve_send(message["handoff"], message["receiver"], message["comm"], bytes.fromhex(uid) if uid else None,
                            float(message["timeout_s"]), answer,
                            None if pieces is None else [(str(b), int(g), int(n)) for b, g, n in pieces],
                            bool(message.get("keep")))
        elif message.get("op") == "release":
            self.serve_release(message["handoff"])

    def send(self, contexts: ImageContexts) -> DirectPayload | PackedContexts | StoredContexts:
        t0 = time.perf_counter()
        tensors = ContextsLayout.tensors(contexts)
        device = tensors[0].device
        if device.type != "cuda" and not self.settings.pull_host_contexts:
            return stored(contexts, self.ranks) if self.ranks > 1 else packed(contexts)
        if device.type == "cuda":
            # Whoever reads the tensors (IPC, NCCL's stream, a fetch) reads finished data.
            torch.cuda.current_stream(device).synchronize()
        layout = ContextsLayout.of(contexts)
        handoff_id = uuid.uuid4().hex
        control = self._control_address()
        self.outbox.put(handoff_id, tensors, layout)
        if self.settings.request_spin_s > 0 and device.type == "cuda" and len(self.links):  # NCCL receivers ask
            self._control.expect(self.settings.request_spin_s)
        ipc = tuple(cuda.export_ipc(t) for t in tensors) if device.type == "cuda" and self.ipc else None
        return DirectPayload(handoff_id, self.key, self._placement(device), control, self._actor, layout, ipc,
                             time.perf_counter() - t0)

    # What a receiver's requests run here, in the sender's process (through the control
    # channel, or `ray_peer` for the fetch).

    def serve_send(self, handoff_id: str, receiver_key: str, comm_key: str, unique_id: bytes | None,
                   timeout_s: float, answer: Callable[[dict[str, Any]], None], pieces: Sequence[Piece] | None = None,
                   keep: bool = False) -> None:
        """Answer a receiver's "send me this handoff" (`started`, `gone`, or why not), and send
        it: its context tensors, or only `pieces` of them (a worker rank's share, each copied
        out contiguous on the pair's stream). The outbox lets go of a handoff sent whole unless
        the receiver asks to `keep` it; one sent in pieces stays too (rank 0 of the receiving
        replica releases it once every rank holds its share). A pair's first handoff (with a `unique_id`: a new communicator, whose connect takes
        a while) is answered at once and sent from a worker thread; later ones right here, in
        the pair's control thread, where the send is posted before the answer goes out: the
        receiver has posted its receive already, so the transfer starts with the post."""
        parcel = self.outbox.peek(handoff_id)
        if parcel is None:
            status = GONE
        elif not self._comms.available:
            status = f"NCCL is unavailable at the sender: {self._comms.unavailable_reason}"
        elif unique_id is None and getattr(self.links.get(receiver_key), "key", None) != comm_key:
            status = "the sender no longer has this pair's communicator"
        else:
            status = STARTED
        if status != STARTED:
            answer({"status": status})
            return
        deadline = time.monotonic() + timeout_s
        keep = keep or pieces is not None
        if unique_id is None:
            self._send_job(handoff_id, parcel, receiver_key, comm_key, None, deadline, pieces, keep, answer)
        else:
            answer({"status": status})
            if self._workers is None:
                self._workers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kv-send")
            self._workers.submit(self._send_job, handoff_id, parcel, receiver_key, comm_key, unique_id, deadline,
                                 pieces, keep)
        self.links.sweep(self.settings.link_idle_s)

    def _send_job(self, handoff_id: str, parcel: Parcel, receiver_key: str, comm_key: str, unique_id: bytes | None,
                  deadline: float, pieces: Sequence[Piece] | None, keep: bool,
                  answer: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Send a parcel, or `pieces` of it, on the pair's communicator (made here from
        `unique_id` for a pair's first handoff); the outbox lets go of it unless `keep`.
        `answer`, when given, is told `started` once the first send is posted, or why it could
        not be."""
        link = None
        try:
            with self.links.pair(receiver_key, deadline):
                if unique_id is not None:
                    self.links.drop(receiver_key)  # an older communicator of this pair
                    link = Link(self._comms.open(unique_id, 2, SENDER_RANK, parcel.tensors[0].device), comm_key)
                    self.links.put(receiver_key, link)
                    await_progress(link.comm, deadline, what="NCCL connect")
                else:
                    link = self.links.get(receiver_key)
                    if link is None or link.key != comm_key:
                        raise PeerRefused("the pair's communicator was dropped")
                for t in parcel.tensors if pieces is None else self._pieces(link, parcel, pieces):
                    link.comm.send(t, RECEIVER_RANK)
                    if answer is not None:
                        self.send_marks["posted"] = time.perf_counter()
                        reply, answer = answer, None
                        reply({"status": STARTED})
                    await_progress(link.comm, deadline, what="NCCL send")
                link.last_used = time.monotonic()
            # Sent: the receiver has it (a receiver that failed at the very end finds it gone and
            # the request is retried), so no release message is needed on this route, unless
            # kept for the other ranks of the receiving replica.
            if not keep:
                self.outbox.take(handoff_id)
        except Exception as exc:  # the receiver times out too and takes the object store
            if answer is not None:  # nothing was posted: say why, and the receiver takes the object store now
                answer({"status": f"the send failed at the sender: {type(exc).__name__}: {exc}"})
            log.warning("KV handoff %s: NCCL send to receiver %s failed (%s: %s); communicator dropped",
                        handoff_id, receiver_key[:8], type(exc).__name__, exc)
            if link is not None:
                self.links.drop(receiver_key, link)

    @staticmethod
    def _pieces(link: Link, parcel: Parcel, pieces: Sequence[Piece]) -> list[torch.Tensor]:
        """The parcel's `pieces`, each copied out contiguous (as NCCL sends) on the pair's
        stream, so that the copies and the sends run in order beside the engine's work."""
        with torch.cuda.stream(link.comm.stream) if link.comm.stream is not None else nullcontext():
            return [parcel.layout.piece(list(parcel.tensors), *piece)[0].contiguous() for piece in pieces]

    def serve_fetch(self, handoff_id: str) -> PackedContexts | None:
        """The parcel packed into host memory (for the object store), taken out of the outbox."""
        parcel = self.outbox.take(handoff_id)
        if parcel is None:
            return None
        t0 = time.perf_counter()
        return PackedContexts(pack(list(parcel.tensors)), parcel.layout, time.perf_counter() - t0)

    def serve_release(self, handoff_id: str) -> None:
        self.outbox.take(handoff_id)

    def close(self) -> None:
        _SENDERS.pop(self.key, None)
        self.links.abort_all()
        self.outbox.clear()
        if self._control is not None:
            self._control.close()
        if self._workers is not None:
            self._workers.shutdown(wait=False, cancel_futures=True)
