"""The GPU routes, for real: the NCCL binding (init, send/recv, deadline and abort) and
handoffs between Ray actors that play the Thinker and the DiT, CUDA IPC on one GPU and NCCL
across two, and a parallel DiT's worker rank taking its share (IPC on one GPU, NCCL on three).
Skipped without CUDA; the others without the GPUs they need. On a GPU machine:

    python -m pytest -q tests/transport/test_gpu.py
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from bagel_ray.transport.direct import DirectSettings
from bagel_ray.transport.nccl import NcclComms, TransferTimeout, await_progress
from tests.transport.peers import digest, make_contexts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
three_gpus = pytest.mark.skipif(torch.cuda.device_count() < 3, reason="needs three GPUs")
CASES = ["text2img", "text2img_think", "img2img"]


# -- the binding, in this process ----------------------------------------------------------


def test_nccl_loads():
    comms = NcclComms()
    assert comms.available, comms.unavailable_reason
    assert len(comms.unique_id()) == 128


def test_an_nccl_init_without_its_peer_times_out_and_aborts():
    comms = NcclComms()
    comm = comms.open(comms.unique_id(), 2, 1, torch.device("cuda", 0))  # rank 0 never comes
    t0 = time.monotonic()
    with pytest.raises(TransferTimeout):
        await_progress(comm, t0 + 1.0, what="NCCL connect")
    comm.abort()
    assert time.monotonic() - t0 < 15


def two_ranks(comms: NcclComms) -> list:
    uid = comms.unique_id()
    ranks: list = [None, None]

    def open_rank(rank: int) -> None:
        ranks[rank] = comms.open(uid, 2, rank, torch.device("cuda", rank))
        await_progress(ranks[rank], time.monotonic() + 60, what="NCCL connect")

    threads = [threading.Thread(target=open_rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert all(ranks), "the two ranks did not connect"
    return ranks


@two_gpus
@pytest.mark.parametrize("blocking_transfers", [True, False])
def test_nccl_send_recv_between_two_gpus_then_a_stalled_recv_aborts(blocking_transfers):
    comms = NcclComms(blocking_transfers)
    sender, receiver = two_ranks(comms)
    # connected: transfers go through the blocking child where NCCL can split one off
    assert sender.blocking_transfers == receiver.blocking_transfers == (blocking_transfers and comms._library().can_split)
    data = torch.randint(0, 255, (64 << 20,), dtype=torch.uint8, device="cuda:0")
    out = torch.empty(64 << 20, dtype=torch.uint8, device="cuda:1")
    # the first transfer makes the connections: a blocking post waits for the peer's, so post from two threads
    posting = threading.Thread(target=sender.send, args=(data, 1))
    posting.start()
    receiver.recv(out, 0)
    posting.join(timeout=60)
    deadline = time.monotonic() + 30
    await_progress(sender, deadline)
    await_progress(receiver, deadline)
    assert torch.equal(out.cpu(), data.cpu())

    receiver.recv(out, 0)  # nobody sends
    t0 = time.monotonic()
    with pytest.raises(TransferTimeout):
        await_progress(receiver, t0 + 1.0)
    receiver.abort()
    sender.abort()
    assert time.monotonic() - t0 < 15


# -- handoffs between actors ----------------------------------------------------------------


@pytest.fixture
def gpu_peers(ray_local):
    """Makes GpuPeer actors, killed after each test so the next test finds its GPUs free."""
    from tests.transport.peers import GpuPeer

    made = []

    def make(transport: str, num_gpus: float, **options):
        made.append(GpuPeer.options(num_gpus=num_gpus).remote(transport, **options))
        return made[-1]

    yield make
    for actor in made:
        ray_local.kill(actor)


def pair(gpu_peers, ray, transport: str, same_gpu: bool, **options):
    sender = gpu_peers(transport, 0.5 if same_gpu else 1)
    receiver = gpu_peers(transport, 0.5 if same_gpu else 1, **options)
    a, b = ray.get([sender.gpu.remote(), receiver.gpu.remote()])
    if (a == b) != same_gpu:
        pytest.skip(f"Ray placed the two actors on {'different GPUs' if same_gpu else 'one GPU'}")
    return sender, receiver


def handoff(ray, sender, receiver, case: str) -> str:
    route, got, _ = ray.get(receiver.receive.remote(sender.send.remote(case)))
    assert got == digest(make_contexts(case, torch.bfloat16)), f"{case} via {route}: contexts differ"
    return route


@pytest.mark.parametrize("transport", ["cuda_ipc", "auto"])
def test_cuda_ipc_on_one_gpu(gpu_peers, ray_local, transport):
    sender, receiver = pair(gpu_peers, ray_local, transport, same_gpu=True)
    for case in CASES:
        assert handoff(ray_local, sender, receiver, case) == "cuda_ipc"


@two_gpus
@pytest.mark.parametrize("transport", ["nccl", "auto"])
def test_nccl_across_two_gpus_one_communicator_per_pair(gpu_peers, ray_local, transport):
    sender, receiver = pair(gpu_peers, ray_local, transport, same_gpu=False)
    for case in CASES + CASES:
        assert handoff(ray_local, sender, receiver, case) == "nccl"
    assert ray_local.get(receiver.links.remote()) == (1, 0)
    assert ray_local.get(sender.links.remote()) == (0, 1)


@two_gpus
def test_nccl_receives_into_the_buffer_made_during_the_previous_transfer(gpu_peers, ray_local):
    sender, receiver = pair(gpu_peers, ray_local, "nccl", same_gpu=False)
    assert handoff(ray_local, sender, receiver, "text2img") == "nccl"  # connects the pair
    for case in CASES:
        assert handoff(ray_local, sender, receiver, case) == "nccl"
        _, spare = ray_local.get(receiver.received_into.remote())
        assert spare is not None
        assert handoff(ray_local, sender, receiver, case) == "nccl"  # the same size: fits the spare
        assert ray_local.get(receiver.received_into.remote())[0] == spare
    ray_local.kill(receiver)  # its GPU, for a receiver that keeps no spare
    plain = gpu_peers("nccl", 1, settings=DirectSettings(spare_buffers=False))
    assert ray_local.get(plain.gpu.remote()) != ray_local.get(sender.gpu.remote())
    for _ in range(2):
        assert handoff(ray_local, sender, plain, "img2img") == "nccl"
        assert ray_local.get(plain.received_into.remote())[1] is None


@pytest.mark.parametrize("transport, same_gpu, route", [
    ("object_store", True, "object_store"),
    ("nccl", True, "fetch"),  # NCCL cannot connect a GPU to itself
    pytest.param("cuda_ipc", False, "fetch", marks=two_gpus),  # Ray hides the other GPU
    pytest.param("object_store", False, "object_store", marks=two_gpus),
])
def test_routes_without_a_gpu_path_still_deliver(gpu_peers, ray_local, transport, same_gpu, route):
    sender, receiver = pair(gpu_peers, ray_local, transport, same_gpu)
    for case in CASES:
        assert handoff(ray_local, sender, receiver, case) == route


@two_gpus
def test_a_stalled_nccl_handoff_falls_back_and_the_next_reconnects(gpu_peers, ray_local):
    sender, receiver = pair(gpu_peers, ray_local, "nccl", same_gpu=False,
                            settings=DirectSettings(transfer_timeout_s=1.0))
    assert handoff(ray_local, sender, receiver, "text2img") == "nccl"  # the pair is connected
    ray_local.get(sender.hold_pair.remote(ray_local.get(receiver.key.remote()), 4.0))
    t0 = time.monotonic()
    assert handoff(ray_local, sender, receiver, "img2img") == "fetch"  # recv posted, aborted at 1 s
    assert time.monotonic() - t0 < 10
    assert handoff(ray_local, sender, receiver, "img2img") == "nccl"  # a new communicator


# -- a parallel DiT's worker rank, its share over CUDA IPC or NCCL ----------------------------


def _outbox_size(peer) -> int:
    return len(peer.transport.sender.outbox)


def _share(peer, payload, wants: dict) -> tuple[str, int, dict]:
    """Run in a GpuPeer playing a worker rank: its share of `payload`, copied to the host."""
    from bagel_ray.transport.shares import fetch_share

    got, stats = fetch_share(payload, wants, peer.device, torch.bfloat16, peer.transport)
    torch.cuda.synchronize(peer.device)
    return stats.route, stats.nbytes, {b: (c.kv.cpu(), c.rope) for b, c in got.items()}


def _release(peer, payload) -> None:
    peer.transport.release(payload)


def check_share_and_release(ray, sender, rank0, rank1, route: str) -> None:
    """One handoff to a 2-rank DiT: rank 0's whole receive has the sender keep it (for rank 1),
    rank 1 gets only cfg_text and its half of cond's heads over `route`, bit for bit, and the
    sender lets go once rank 0 releases it."""
    from bagel_ray.engine.dit_parallel import head_slice

    payload = ray.get(sender.send.remote("text2img"))
    got_route, got, _ = ray.get(rank0.receive.remote(payload))
    sent = make_contexts("text2img", torch.bfloat16)
    assert got_route == route and got == digest(sent)
    assert ray.get(sender.__ray_call__.remote(_outbox_size)) == 1  # kept for rank 1
    got_route, nbytes, share = ray.get(rank1.__ray_call__.remote(_share, payload, {"cfg_text": (0, 1), "cond": (1, 2)}))
    assert got_route == route
    for name, want in {"cfg_text": sent.branch("cfg_text"), "cond": head_slice(sent.gen, 1, 2)}.items():
        kv, rope = share[name]
        assert rope == want.rope and torch.equal(kv.view(torch.int16), want.kv.contiguous().view(torch.int16)), name
    assert nbytes == sent.branch("cfg_text").nbytes + head_slice(sent.gen, 1, 2).nbytes
    ray.get(rank0.__ray_call__.remote(_release, payload))
    deadline = time.monotonic() + 10
    while ray.get(sender.__ray_call__.remote(_outbox_size)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.get(sender.__ray_call__.remote(_outbox_size)) == 0


def test_a_worker_rank_maps_its_share_over_cuda_ipc_and_rank_0_releases_it(gpu_peers, ray_local):
    """Thinker, rank 0 and rank 1 of a 2-rank DiT on one GPU: rank 1 maps the handoff itself."""
    sender, rank0, rank1 = (gpu_peers("cuda_ipc", 0.3, ranks=2) for _ in range(3))
    if len(set(ray_local.get([p.gpu.remote() for p in (sender, rank0, rank1)]))) != 1:
        pytest.skip("Ray placed the three actors on different GPUs")
    check_share_and_release(ray_local, sender, rank0, rank1, "cuda_ipc")


@three_gpus
@pytest.mark.parametrize("transport", ["nccl", "auto"])
def test_a_worker_rank_pulls_its_share_over_nccl_and_rank_0_releases_it(gpu_peers, ray_local, transport):
    """Thinker, rank 0 and rank 1 of a 2-rank DiT on three GPUs: rank 1 pulls its pieces over a
    NCCL pair of its own, twice (the second over the pairs the first made)."""
    sender, rank0, rank1 = (gpu_peers(transport, 1, ranks=2) for _ in range(3))
    assert len(set(ray_local.get([p.gpu.remote() for p in (sender, rank0, rank1)]))) == 3
    for _ in range(2):
        check_share_and_release(ray_local, sender, rank0, rank1, "nccl")
