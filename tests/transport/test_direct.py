"""The GPU-direct transport on CPU: its decision table, the sender's outbox, the deadlines,
and every way a pull falls back or fails, against real Ray actors (and a Serve replica)
playing the sending Thinker. Only the communicator is replaced, by one that stalls: the
NCCL transfers themselves are in test_gpu.py."""

from __future__ import annotations

import logging
import pickle
import threading
import time

import pytest
import torch

from bagel_ray.transport.cuda import on_device
from bagel_ray.transport.direct import AutoTransport, DirectSettings, NcclTransport
from bagel_ray.transport.routes import DirectPayload, Placement, plan_route
from bagel_ray.transport.errors import HandoffGone
from bagel_ray.transport.layout import ContextsLayout
from bagel_ray.transport.nccl import TransferTimeout, await_progress, comm_config
from bagel_ray.transport.outbox import Outbox
from tests.transport.peers import FixedPlacement, StalledComms, digest, make_contexts

CPU = torch.device("cpu")
BOTH = frozenset({"cuda_ipc", "nccl"})
SENDER_GPU = Placement("n1", "GPU-s", ("GPU-s",), True)
RECEIVER_GPU = Placement("n1", "GPU-r", ("GPU-r",), True)


# -- the decision table --------------------------------------------------------------------

A, B = "GPU-a", "GPU-b"


def place(node: str = "n1", gpu: str | None = A, visible: tuple[str, ...] = (A,), nccl: bool = True) -> Placement:
    return Placement(node, gpu, visible, nccl)


@pytest.mark.parametrize("routes, sender, receiver, local, has_ipc, want", [
    (BOTH, place(), place(), True, True, "local"),  # same process beats everything
    (BOTH, place(gpu=None), place(), False, False, "fetch"),  # host contexts
    (BOTH, place(), place(gpu=None), False, True, "fetch"),  # receiver on the CPU
    (BOTH, place(), place(), False, True, "cuda_ipc"),  # same GPU
    (BOTH, place(), place(gpu=B, visible=(A, B)), False, True, "cuda_ipc"),  # another GPU this process sees
    (BOTH, place(), place(gpu=B, visible=(B,)), False, True, "nccl"),  # another GPU (Ray isolates them)
    (BOTH, place(), place(node="n2", gpu=B, visible=(A,)), False, True, "nccl"),  # another node
    (BOTH, place(), place(), False, False, "fetch"),  # same GPU, no IPC handles: NCCL can't do one GPU
    (BOTH, place(nccl=False), place(gpu=B, visible=(B,)), False, True, "fetch"),
    (BOTH, place(), place(gpu=B, visible=(B,), nccl=False), False, True, "fetch"),
    (frozenset({"cuda_ipc"}), place(), place(gpu=B, visible=(B,)), False, True, "fetch"),
    (frozenset({"cuda_ipc"}), place(), place(node="n2"), False, True, "fetch"),
    (frozenset({"nccl"}), place(), place(), False, True, "fetch"),  # nccl on one GPU: not possible
    (frozenset({"nccl"}), place(), place(gpu=B, visible=(A, B)), False, True, "nccl"),
])
def test_plan_route(routes, sender, receiver, local, has_ipc, want):
    route = plan_route(routes, sender, receiver, local=local, has_ipc=has_ipc)
    assert route.name == want
    assert route.reason


def test_plan_route_says_why_it_falls_back():
    route = plan_route(BOTH, place(nccl=False), place(node="n2", gpu=B, visible=(B,)), local=False, has_ipc=True)
    assert route.name == "fetch"
    assert "another node" in route.reason and "unavailable at the sender" in route.reason


# -- the outbox ----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def parcel_of(nbytes: int) -> tuple[list[torch.Tensor], ContextsLayout]:
    contexts = make_contexts("text2img", torch.float32, length=nbytes // (3 * 2 * 4 * 64 * 4))
    return ContextsLayout.tensors(contexts), ContextsLayout.of(contexts)


def test_outbox_evicts_the_oldest_past_its_byte_bound(caplog):
    tensors, layout = parcel_of(12288 * 10)
    outbox = Outbox(max_bytes=layout.nbytes * 2, ttl_s=60, clock=Clock())
    with caplog.at_level(logging.WARNING, logger="bagel_ray.transport.outbox"):
        for key in "abc":
            outbox.put(key, tensors, layout)
    assert "a" not in outbox and "b" in outbox and "c" in outbox
    assert outbox.nbytes == 2 * layout.nbytes and len(outbox) == 2
    assert any("dropped handoff a" in r.getMessage() for r in caplog.records)


def test_outbox_keeps_one_parcel_bigger_than_its_bound():
    tensors, layout = parcel_of(12288 * 10)
    outbox = Outbox(max_bytes=layout.nbytes // 2, ttl_s=60, clock=Clock())
    outbox.put("a", tensors, layout)
    outbox.put("b", tensors, layout)
    assert "a" not in outbox and "b" in outbox


def test_outbox_drops_parcels_past_their_age():
    clock = Clock()
    tensors, layout = parcel_of(12288)
    outbox = Outbox(max_bytes=1 << 30, ttl_s=10, clock=clock)
    outbox.put("old", tensors, layout)
    clock.now = 6
    outbox.put("new", tensors, layout)
    clock.now = 10.5
    assert outbox.peek("old") is None and outbox.peek("new") is not None
    assert outbox.nbytes == layout.nbytes
    clock.now = 16.5
    assert outbox.take("new") is None and len(outbox) == 0 and outbox.nbytes == 0


def test_outbox_take_is_once_and_peek_leaves_it():
    tensors, layout = parcel_of(12288)
    outbox = Outbox(max_bytes=1 << 30, ttl_s=10, clock=Clock())
    outbox.put("a", tensors, layout)
    assert outbox.peek("a") is not None and outbox.peek("a") is not None
    parcel = outbox.take("a")
    assert parcel is not None and parcel.tensors[0] is tensors[0]  # kept, not copied
    assert outbox.take("a") is None
    with pytest.raises(KeyError):
        outbox.put("b", tensors, layout)
        outbox.put("b", tensors, layout)


# -- deadlines -----------------------------------------------------------------------------


def test_await_progress_stops_at_the_deadline():
    comm = StalledComms().open(b"", 2, 1, CPU)
    t0 = time.monotonic()
    with pytest.raises(TransferTimeout):
        await_progress(comm, t0 + 0.2)
    assert 0.2 <= time.monotonic() - t0 < 1.0


def test_await_progress_stops_when_the_check_raises():
    comm = StalledComms().open(b"", 2, 1, CPU)
    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the peer said no")

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="said no"):
        await_progress(comm, t0 + 30, check, check_every_s=0.01)
    assert time.monotonic() - t0 < 1.0


def test_await_progress_raises_what_the_communicator_raises():
    comm = StalledComms(fail=True).open(b"", 2, 1, CPU)
    with pytest.raises(RuntimeError, match="failed"):
        await_progress(comm, time.monotonic() + 30)


def test_nccl_config_is_the_2_14_head():
    config = comm_config(blocking=False)
    assert (config.size, config.magic, config.version, config.blocking) == (20, 0xCAFEBEEF, 21400, 0)


def test_nccl_without_cuda_is_unavailable_and_says_why():
    from bagel_ray.transport.nccl import NcclComms, NcclError

    if torch.cuda.is_available():
        pytest.skip("this process has CUDA")
    comms = NcclComms()
    assert not comms.available and "CUDA" in comms.unavailable_reason
    with pytest.raises(NcclError, match="unavailable"):
        comms.unique_id()


def test_ipc_handle_is_rewritten_to_the_local_device():
    """The receiver's index of the sender's GPU replaces the sender's, by argument name."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    args = (torch.Tensor, (4,), (1,), 0, torch.UntypedStorage, torch.uint8, 3, b"handle", 4, 0, False, b"ref", 0, b"ev", True)
    fn, new_args, kwargs = on_device((rebuild_cuda_tensor, args), 1)
    assert fn is rebuild_cuda_tensor and not kwargs
    assert new_args[6] == 1 and new_args[:6] == args[:6] and new_args[7:] == args[7:]


# -- HandoffGone reaches the driver as a retryable error -----------------------------------


def test_handoff_gone_pickles_and_is_an_unavailable_actor():
    from ray.exceptions import ActorUnavailableError

    err = pickle.loads(pickle.dumps(HandoffGone("handoff x is gone")))
    assert isinstance(err, ActorUnavailableError) and str(err) == "handoff x is gone"


def test_handoff_gone_raised_in_a_replica_is_caught_as_retryable(ray_local):
    """The driver retries `(ActorDiedError, ActorUnavailableError)`; a HandoffGone raised in
    a replica arrives wrapped in a RayTaskError that is an instance of it."""
    from ray.exceptions import ActorUnavailableError

    @ray_local.remote(num_cpus=0)
    def fails() -> None:
        raise HandoffGone("handoff y is gone")

    with pytest.raises(ActorUnavailableError, match="handoff y is gone"):
        ray_local.get(fails.remote())


# -- pulls from a real Ray actor ------------------------------------------------------------


@pytest.fixture(scope="module")
def actors(ray_local):
    """Makes SenderActors; all are killed at the end of the module (actors start slowly)."""
    made = []

    def make(**options):
        from tests.transport.peers import SenderActor

        made.append(SenderActor.remote(**options))
        return made[-1]

    yield make
    for actor in made:
        ray_local.kill(actor)


@pytest.fixture(scope="module")
def host_sender(actors):
    """A sender whose contexts stay in its outbox (host memory): pulled through the object store."""
    return actors()


@pytest.fixture
def sender(host_sender, ray_local):
    """`host_sender` with a default outbox for each test."""
    ray_local.get(host_sender.set_outbox.remote())
    return host_sender


@pytest.fixture(scope="module")
def stalled_sender(actors):
    """A sender that claims a GPU with NCCL, whose communicators never finish."""
    return actors(placement=SENDER_GPU, stalled=True)


@pytest.mark.parametrize("case", ["text2img", "img2img"])
def test_pull_through_the_object_store_from_an_actor(sender, ray_local, case):
    payload = ray_local.get(sender.send.remote(case))
    assert isinstance(payload, DirectPayload) and payload.actor is not None
    contexts, stats = AutoTransport().receive(payload, CPU)
    assert stats.route == "fetch" and stats.nbytes == payload.nbytes
    assert digest(contexts) == digest(make_contexts(case, torch.float32))
    assert ray_local.get(sender.outbox_size.remote()) == 0  # fetched means taken


def test_a_handoff_is_pulled_once(sender, ray_local):
    payload = ray_local.get(sender.send.remote("text2img"))
    receiver = AutoTransport()
    receiver.receive(payload, CPU)
    with pytest.raises(HandoffGone, match="gone"):
        receiver.receive(payload, CPU)


def test_an_evicted_handoff_is_gone(sender, ray_local):
    one = make_contexts("text2img", torch.float32).nbytes
    ray_local.get(sender.set_outbox.remote(max_bytes=one + one // 2))
    first = ray_local.get(sender.send.remote("text2img"))
    second = ray_local.get(sender.send.remote("text2img"))
    receiver = AutoTransport()
    with pytest.raises(HandoffGone, match="too old, or its outbox was full"):
        receiver.receive(first, CPU)
    contexts, _ = receiver.receive(second, CPU)
    assert digest(contexts) == digest(make_contexts("text2img", torch.float32))


def test_an_expired_handoff_is_gone(sender, ray_local):
    ray_local.get(sender.set_outbox.remote(ttl_s=0.3))
    payload = ray_local.get(sender.send.remote("text2img"))
    time.sleep(0.5)
    with pytest.raises(HandoffGone):
        AutoTransport().receive(payload, CPU)
    assert ray_local.get(sender.outbox_size.remote()) == 0


def kill_and_wait(ray, actor) -> None:
    """Kill `actor` and wait until Ray reports it dead (Ray itself may take up to a minute to
    call a dead actor dead; what is timed below is only the transport's own waiting)."""
    from ray.exceptions import RayActorError

    ray.kill(actor)  # asynchronous: calls made right after it may still run
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            ray.get(actor.outbox_size.remote(), timeout=90)
        except RayActorError:
            return
        time.sleep(0.1)
    raise AssertionError("Ray did not report the killed actor dead")


def test_a_dead_sender_fails_the_pull_at_once(actors, ray_local):
    from ray.exceptions import RayActorError

    sender = actors()
    payload = ray_local.get(sender.send.remote("text2img"))
    kill_and_wait(ray_local, sender)
    t0 = time.monotonic()
    with pytest.raises(RayActorError):  # ActorDiedError: the driver retries the request
        AutoTransport().receive(payload, CPU)
    assert time.monotonic() - t0 < 10


# -- NCCL routes that stall, fail or lose their peer: deadlines and fallbacks ---------------



def nccl_receiver(comms: StalledComms, timeout_s: float = 0.4) -> AutoTransport:
    return AutoTransport(DirectSettings(connect_timeout_s=timeout_s, transfer_timeout_s=timeout_s), comms=comms,
                         placement=FixedPlacement(RECEIVER_GPU))


@pytest.mark.parametrize("case", ["text2img", "img2img"])
def test_a_stalled_nccl_pull_aborts_at_its_deadline_and_falls_back(actors, ray_local, case, caplog):
    sender = actors(placement=SENDER_GPU, stalled=True)  # its own: the log of its communicators is checked
    payload = ray_local.get(sender.send.remote(case))
    comms = StalledComms()
    receiver = nccl_receiver(comms)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="bagel_ray.transport.direct"):
        contexts, stats = receiver.receive(payload, CPU)
    elapsed = time.monotonic() - t0
    assert stats.route == "fetch"
    assert digest(contexts) == digest(make_contexts(case, torch.float32))
    assert 0.8 <= elapsed < 5.0  # connect + transfer budget of a new pair, then the fetch
    assert comms.log == ["open rank 1", "abort"]  # init never finished: aborted, no recv posted
    assert not receiver.receiver.links  # the pair's communicator is gone; the next handoff makes a new one
    assert any("over nccl failed" in r.getMessage() and "TransferTimeout" in r.getMessage() for r in caplog.records)
    deadline = time.monotonic() + 5
    while "abort" not in ray_local.get(sender.comm_log.remote()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ray_local.get(sender.comm_log.remote()) == ["open rank 0", "abort"]  # the sender gave up too


def test_a_failing_nccl_pull_falls_back_at_once(stalled_sender, ray_local):
    payload = ray_local.get(stalled_sender.send.remote("text2img"))
    comms = StalledComms(fail=True)
    t0 = time.monotonic()
    contexts, stats = nccl_receiver(comms, timeout_s=30).receive(payload, CPU)
    assert stats.route == "fetch" and time.monotonic() - t0 < 5
    assert digest(contexts) == digest(make_contexts("text2img", torch.float32))
    assert comms.log[-1] == "abort"


def test_an_nccl_pull_from_a_sender_without_nccl_falls_back_at_once(actors, ray_local):
    """The payload says the sender has NCCL but its answer says otherwise: no wait."""
    if torch.cuda.is_available():
        pytest.skip("NCCL may load here")
    sender = actors(placement=SENDER_GPU)  # the real NCCL factory: unavailable without CUDA
    payload = ray_local.get(sender.send.remote("text2img"))
    comms = StalledComms()
    t0 = time.monotonic()
    contexts, stats = nccl_receiver(comms, timeout_s=30).receive(payload, CPU)
    assert stats.route == "fetch" and time.monotonic() - t0 < 5
    assert comms.log == []  # refused before the receiver made a communicator


def test_an_nccl_pull_of_a_gone_handoff_raises_gone(stalled_sender, ray_local):
    first = ray_local.get(stalled_sender.send.remote("text2img"))
    ray_local.get(stalled_sender.set_outbox.remote())  # drops it
    t0 = time.monotonic()
    with pytest.raises(HandoffGone):
        nccl_receiver(StalledComms(), timeout_s=30).receive(first, CPU)
    assert time.monotonic() - t0 < 5


def test_an_nccl_pull_from_a_dead_sender_fails_at_once(actors, ray_local):
    from ray.exceptions import RayActorError

    sender = actors(placement=SENDER_GPU, stalled=True)
    payload = ray_local.get(sender.send.remote("text2img"))
    kill_and_wait(ray_local, sender)
    comms = StalledComms()
    t0 = time.monotonic()
    receiver = nccl_receiver(comms, timeout_s=30)
    with pytest.raises(RayActorError):  # its control channel refuses, then the fetch finds it dead
        receiver.receive(payload, CPU)
    assert time.monotonic() - t0 < 10
    assert not receiver.receiver.links and not receiver.receiver.clients


def test_a_sender_that_does_not_answer_is_given_up_on(stalled_sender, ray_local, caplog):
    """A control channel that accepts but never answers (a frozen sender, or a host that
    died without closing it): given up on after `reply_timeout_s`, the handoff fetched."""
    import dataclasses
    import socket

    payload = ray_local.get(stalled_sender.send.remote("text2img"))
    with socket.create_server(("127.0.0.1", 0)) as silent:
        silent_payload = dataclasses.replace(payload, control=silent.getsockname())
        comms = StalledComms()
        receiver = AutoTransport(DirectSettings(reply_timeout_s=0.3), comms=comms, placement=FixedPlacement(RECEIVER_GPU))
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="bagel_ray.transport.direct"):
            contexts, stats = receiver.receive(silent_payload, CPU)
    assert stats.route == "fetch" and time.monotonic() - t0 < 10
    assert digest(contexts) == digest(make_contexts("text2img", torch.float32))
    assert comms.log == [] and not receiver.receiver.clients
    assert any("did not answer within" in r.getMessage() for r in caplog.records)


def test_a_sender_dying_mid_transfer_is_noticed_on_its_control_channel(actors, ray_local):
    """The sender's process goes away while the receiver waits for the transfer: the closed
    connection ends the wait long before the transfer deadline."""
    sender = actors(placement=SENDER_GPU, stalled=True)
    payload = ray_local.get(sender.send.remote("text2img"))
    comms = StalledComms()
    receiver = nccl_receiver(comms, timeout_s=60)
    threading.Timer(1.0, ray_local.kill, args=(sender,)).start()
    t0 = time.monotonic()
    with pytest.raises(Exception):  # then the fetch: the actor is dead (or the handoff gone)
        receiver.receive(payload, CPU)
    assert time.monotonic() - t0 < 30
    assert comms.log[-1] == "abort" and not receiver.receiver.links


def test_an_unreachable_control_channel_sends_later_handoffs_through_the_object_store(stalled_sender, ray_local):
    """A sender whose control port cannot be reached (closed here; a firewall between nodes):
    the first handoff falls back after the failed connect, later ones skip the GPU route."""
    import dataclasses
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()  # nothing listens there once the socket is closed
    comms = StalledComms()
    receiver = AutoTransport(DirectSettings(reply_timeout_s=0.5), comms=comms, placement=FixedPlacement(RECEIVER_GPU))
    for _ in range(2):
        payload = dataclasses.replace(ray_local.get(stalled_sender.send.remote("text2img")), control=closed)
        contexts, stats = receiver.receive(payload, CPU)
        assert stats.route == "fetch" and digest(contexts) == digest(make_contexts("text2img", torch.float32))
    assert comms.log == [] and payload.sender_key in receiver.receiver.unreachable


def test_control_channel_rejects_a_wrong_key():
    from bagel_ray.transport.control import ControlClient, ControlError, ControlServer

    def request(key: str, op: str) -> dict:
        client = ControlClient(server.address, key, 5)
        client.notify({"op": op})
        return client.answer(5)

    seen = []
    server = ControlServer("right", lambda m, answer: seen.append(m) or answer({"ok": True}), "127.0.0.1")
    try:
        assert request("right", "x") == {"ok": True}
        with pytest.raises(ControlError, match="closed the connection"):
            request("wrong", "x")
        assert [m["op"] for m in seen] == ["x"]
        raw = ControlClient(server.address, "right", 5)
        raw._sock.sendall(b"not json\n")
        with pytest.raises(ControlError, match="closed the connection"):
            raw.answer(5)
        assert request("right", "y") == {"ok": True}  # still serving
    finally:
        server.close()


def test_nccl_pulls_of_one_pair_wait_for_each_other_within_the_deadline(stalled_sender, ray_local):
    """Two handoffs from one sender: the second waits for the pair, and both end by their
    deadlines (never a hang), each through the object store."""
    payloads = [ray_local.get(stalled_sender.send.remote("text2img")) for _ in range(2)]
    receiver = nccl_receiver(StalledComms(), timeout_s=0.3)
    results: list = []
    threads = [threading.Thread(target=lambda p=p: results.append(receiver.receive(p, CPU)[1].route)) for p in payloads]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert sorted(results) == ["fetch", "fetch"] and time.monotonic() - t0 < 10


def test_idle_pairs_are_dropped():
    comms = StalledComms()
    receiver = AutoTransport(DirectSettings(link_idle_s=0.0), comms=comms, placement=FixedPlacement(RECEIVER_GPU))
    from bagel_ray.transport.links import Link

    receiver.receiver.links.put("someone", Link(comms.open(b"", 2, 1, CPU), "k", last_used=time.monotonic() - 1))
    receiver.receiver.links.sweep(receiver.receiver.settings.link_idle_s)
    assert not receiver.receiver.links and comms.log == ["open rank 1", "abort"]


def test_close_aborts_every_pair_and_empties_the_outbox():
    comms = StalledComms()
    transport = NcclTransport(DirectSettings(pull_host_contexts=True), comms=comms)
    from bagel_ray.transport.links import Link
    from bagel_ray.transport.sender import local_sender

    transport.sender.links.put("r", Link(comms.open(b"", 2, 0, CPU), "k"))
    transport.send(make_contexts("text2img", torch.float32))
    transport.close()
    assert comms.log[-1] == "abort" and not transport.sender.links and len(transport.sender.outbox) == 0
    assert local_sender(transport.key) is None



class _DoneComm:
    """A communicator whose sends finish at once (or whose posts fail), logging what it does."""

    stream = None

    def __init__(self, log: list[str], fail: bool = False) -> None:
        self.log, self.fail = log, fail

    def send(self, tensor: torch.Tensor, peer: int) -> None:
        if self.fail:
            raise RuntimeError("the post failed")
        self.log.append("posted")

    def progress(self) -> bool:
        return True

    def abort(self) -> None:
        self.log.append("aborted")


def test_a_later_handoff_is_posted_before_it_is_answered():
    """On a connected pair the receiver has posted its receive before it asks, so the sender
    posts its send first and answers after: the transfer starts with the post. A post that
    fails is answered with the reason (not "started"), and the pair's communicator dropped."""
    from bagel_ray.transport.links import Link

    transport = NcclTransport(DirectSettings(pull_host_contexts=True), comms=StalledComms())
    log: list[str] = []
    transport.sender.links.put("r", Link(_DoneComm(log), "k"))
    payload = transport.send(make_contexts("text2img", torch.float32))
    transport.sender.serve_send(payload.handoff_id, "r", "k", None, 5.0, lambda reply: log.append(reply["status"]))
    assert log == ["posted", "started"] and len(transport.sender.outbox) == 0

    log.clear()
    transport.sender.links.put("r", Link(_DoneComm(log, fail=True), "k"))
    payload = transport.send(make_contexts("text2img", torch.float32))
    transport.sender.serve_send(payload.handoff_id, "r", "k", None, 5.0, lambda reply: log.append(reply["status"]))
    assert len(log) == 2 and "the post failed" in log[0] and log[1] == "aborted"
    assert "r" not in transport.sender.links
    transport.close()

# -- a Serve replica as the sender ----------------------------------------------------------


def test_pull_from_a_serve_replica(ray_local):
    """The receiver reaches the very replica that made the payload (not any replica of the
    deployment) through its actor handle."""
    import socket

    from ray import serve

    from tests.transport.peers import sender_deployment

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    handle = serve.run(sender_deployment().options(num_replicas=2).bind(), name="kv-sender-test", route_prefix=None)
    try:
        payloads = [handle.send.remote(case).result(timeout_s=60) for case in ("text2img", "img2img", "text2img_think")]
        receiver = AutoTransport()
        for case, payload in zip(("text2img", "img2img", "text2img_think"), payloads):
            contexts, stats = receiver.receive(payload, CPU)
            assert stats.route == "fetch"
            assert digest(contexts) == digest(make_contexts(case, torch.float32))
    finally:
        serve.delete("kv-sender-test")


def test_nccl_settings_are_defaults_the_environment_overrides():
    from bagel_ray.transport.nccl import NCCL_SETTINGS, apply_nccl_settings

    env: dict[str, str] = {}
    apply_nccl_settings(env)
    assert env == NCCL_SETTINGS and env["NCCL_GRAPH_MIXING_SUPPORT"] == "0"
    mine = {"NCCL_GRAPH_MIXING_SUPPORT": "1"}
    apply_nccl_settings(mine)
    assert mine == {"NCCL_GRAPH_MIXING_SUPPORT": "1"}


@pytest.mark.parametrize("spare_bytes, used", [(0, True), (40_000, True), (-2, False), (60_000, False)])
def test_a_receive_fills_the_spare_buffer_when_it_fits(spare_bytes, used):
    """The spare (made during the previous transfer) is used when the contexts fit it and it
    is at most a quarter bigger; either way the receiver has no spare afterwards."""
    from types import SimpleNamespace

    from bagel_ray.transport.links import Link

    sent = make_contexts("img2img", torch.bfloat16)  # two context tensors
    layout = ContextsLayout.of(sent)
    receiver = NcclTransport(comms=StalledComms(), placement=FixedPlacement(RECEIVER_GPU))
    receiver.receiver.spare = spare = torch.empty(layout.nbytes + spare_bytes, dtype=torch.uint8)
    link = Link(_DoneComm([]), "k")
    tensors = receiver.receiver.receive_buffers(link, SimpleNamespace(layout=layout, nbytes=layout.nbytes), CPU)
    assert receiver.receiver.spare is None
    starts = [tensors[0].data_ptr(), tensors[1].data_ptr()]
    assert (starts == [spare.data_ptr(), spare.data_ptr() + layout.sizes[0]]) == used
    for t, want in zip(tensors, ContextsLayout.tensors(sent)):
        t.copy_(want)
    assert digest(layout.assemble(tensors)) == digest(sent)


def test_no_room_for_a_spare_buffer_leaves_the_receive_as_it_was(monkeypatch):
    from bagel_ray.transport.links import Link
    from bagel_ray.transport.receiver import Receiver

    def full(link, nbytes, device):
        raise torch.OutOfMemoryError("no room")

    receiver = NcclTransport(comms=StalledComms(), placement=FixedPlacement(RECEIVER_GPU))
    link = Link(_DoneComm([]), "k")
    receiver.receiver.make_spare(link, 1024, CPU)
    assert receiver.receiver.spare is not None and receiver.receiver.spare.numel() == 1024
    monkeypatch.setattr(Receiver, "buffer", staticmethod(full))
    receiver.receiver.make_spare(link, 2048, CPU)
    assert receiver.receiver.spare.numel() == 1024  # kept; the next receive allocates if it does not fit
