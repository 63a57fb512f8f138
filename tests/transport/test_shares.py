"""A rank's share of a handoff (bagel_ray/transport/shares.py): for a DiT replica of several
ranks the object-store backends store the contexts by reference, in pieces (row ranges at the
prefix branches' cut points x KV head groups), so that each rank gets exactly the bytes of its
own branches: the whole contexts for rank 0, bit for bit, and for a worker rank only the pieces
its branches cover, counted here by hand. Payloads a rank cannot reach itself are left to
rank 0's relay (None)."""

from __future__ import annotations

import time

import pytest
import torch

from bagel_ray.engine.dit_parallel import head_slice
from bagel_ray.transport.base import make_transport
from bagel_ray.transport.direct import AutoTransport
from bagel_ray.transport.object_store import PackedContexts, StoredContexts
from bagel_ray.transport.shares import fetch_share, portable
from tests.transport.peers import HEAD_DIM, KV_HEADS, LAYERS, PULL_HOST_CONTEXTS, GlooPeer, digest, make_contexts
from tests.transport.test_transport import BRANCHES, CPU, assert_same_contexts, bits


def row_bytes(heads: int, dtype: torch.dtype) -> int:
    """Bytes of one context row of `heads` KV heads over every layer (K and V)."""
    return LAYERS * 2 * heads * HEAD_DIM * dtype.itemsize


@pytest.mark.parametrize("backend", ["object_store", "auto"])
@pytest.mark.parametrize("case", ["text2img", "text2img_think", "img2img"])
def test_a_several_rank_receiver_gets_the_contexts_by_reference_in_pieces(ray_local, backend, case):
    """Sent for 2 ranks, the payload is refs (no KV inside it, it travels as Ray carries it),
    and rank 0's whole receive is bit-identical."""
    transport = make_transport(backend, ranks=2)
    sent = make_contexts(case, torch.bfloat16)
    payload = ray_local.get(ray_local.put(transport.send(sent)))
    assert isinstance(payload, StoredContexts) and portable(payload)
    assert payload.head_groups == 2  # 4 KV heads over 2 ranks
    gen_rows = {"text2img": (0, 6, 41), "text2img_think": (0, 6, 33, 41), "img2img": (0, 30, 41)}[case]
    assert payload.rows[0] == gen_rows  # cut where the prefix branches end
    got, stats = transport.receive(payload, CPU)
    assert_same_contexts(got, sent)
    assert stats.route == "object_store" and stats.nbytes == sent.nbytes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_a_rank_gets_only_the_pieces_its_branches_cover(ray_local, dtype):
    """text2img over 2 cfg ranks with cond helped: rank 1 wants cfg_text (the first 6 rows, all
    heads) and its half of cond's heads; it gets the 6-row prefix whole and the other 35 rows
    of its 2 heads, nothing of the other 2 heads past the prefix. An img2img rank with cfg_img
    alone gets only cfg_img's own context. The dtype asked for is the engine's."""
    sent = make_contexts("text2img", dtype)
    payload = ray_local.get(ray_local.put(make_transport("object_store", ranks=2).send(sent)))
    mine, stats = fetch_share(payload, {"cfg_text": (0, 1), "cond": (1, 2)}, CPU, torch.float32)
    assert list(mine) == ["cfg_text", "cond"] and stats.route == "object_store"
    want = {"cfg_text": sent.branch("cfg_text"), "cond": head_slice(sent.gen, 1, 2)}
    for name, context in want.items():
        assert mine[name].rope == context.rope and mine[name].kv.dtype == torch.float32, name
        assert torch.equal(bits(mine[name].kv), bits(context.kv.float())), name
    assert stats.nbytes == 6 * row_bytes(KV_HEADS, dtype) + 35 * row_bytes(KV_HEADS // 2, dtype)
    assert stats.nbytes < sent.nbytes

    edit = make_contexts("img2img", dtype)
    payload = ray_local.get(ray_local.put(make_transport("object_store", ranks=3).send(edit)))
    assert payload.head_groups == 1  # 3 does not divide 4 heads
    mine, stats = fetch_share(payload, {"cfg_img": (0, 1)}, CPU, dtype)
    assert torch.equal(bits(mine["cfg_img"].kv), bits(edit.cfg_img.kv)) and mine["cfg_img"].rope == edit.cfg_img.rope
    assert stats.nbytes == edit.cfg_img.nbytes == 23 * row_bytes(KV_HEADS, dtype)
    mine, stats = fetch_share(payload, {b: (0, 1) for b in BRANCHES}, CPU, dtype)  # every branch: each piece once
    assert stats.nbytes == edit.nbytes
    assert all(torch.equal(bits(mine[b].kv), bits(edit.branch(b).kv)) for b in BRANCHES)


def test_payloads_a_rank_cannot_reach_are_left_to_rank_0(ray_local):
    """One packed buffer (a one-rank receiver's payload) is already in rank 0's process; a
    GPU-direct payload without IPC handles, or any on a CPU rank, takes NCCL or the pull,
    which go to one receiver: rank 0 relays those."""
    sent = make_contexts("text2img", torch.float32)
    packed = make_transport("object_store").send(sent)
    assert isinstance(packed, PackedContexts) and not portable(packed)
    assert fetch_share(packed, {"cfg_text": (0, 1)}, CPU, torch.float32) is None
    direct = AutoTransport(PULL_HOST_CONTEXTS, ranks=2)  # the path of GPU contexts: the payload names the sender
    payload = direct.send(sent)
    assert portable(payload) and payload.ipc is None
    assert fetch_share(payload, {"cfg_text": (0, 1)}, CPU, torch.float32) is None
    direct.close()


# -- GPU-direct payloads over NCCL (gloo plays NCCL, each peer claims a GPU of its own) --------


def _outbox_empties(sender, ray, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while ray.get(sender.outbox_size.remote()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return ray.get(sender.outbox_size.remote()) == 0


@pytest.mark.parametrize("case, wants", [
    ("text2img", {"cfg_text": (0, 1), "cond": (1, 2)}),  # CFG 2 with cond helped: the prefix, half of cond's heads
    ("img2img", {"cfg_img": (0, 1)}),  # the rank of cfg_img: its own context only
    ("text2img_think", {"cond": (3, 4)}),  # a quarter of cond's heads
])
def test_a_worker_rank_pulls_its_share_over_its_own_nccl_pair(ray_local, case, wants):
    """Thinker, rank 0 and rank 1 of a 2-rank DiT on three GPUs: rank 0 receives the whole
    handoff over NCCL and has the sender keep it; rank 1 asks the sender for its pieces over a
    pair of its own and gets exactly them, bit for bit, in the engine's dtype; the sender lets
    go once rank 0 releases it."""
    sender, rank0, rank1 = GlooPeer.remote("thinker"), GlooPeer.remote("dit0", 2), GlooPeer.remote("dit1", 2)
    try:
        sent = make_contexts(case, torch.bfloat16)
        for round_ in range(2):  # the second handoff reuses the pairs made by the first
            payload = ray_local.get(sender.send.remote(case))
            assert ray_local.get(rank0.receive.remote(payload)) == ("nccl", digest(sent))
            assert ray_local.get(sender.outbox_size.remote()) == 1  # kept for rank 1
            route, nbytes, share = ray_local.get(rank1.share.remote(payload, wants, torch.float32))
            assert route == "nccl" and list(share) == list(wants)
            for branch, (group, parts) in wants.items():
                want = sent.branch(branch)
                want = head_slice(want, group, parts) if parts > 1 else want
                kv, rope = share[branch]
                assert rope == want.rope and kv.dtype == torch.float32, branch
                assert torch.equal(bits(kv), bits(want.kv.float())), branch
            assert nbytes == sum((head_slice(sent.branch(b), g, n) if n > 1 else sent.branch(b)).nbytes
                                 for b, (g, n) in wants.items())
            assert nbytes < sent.nbytes
            assert ray_local.get(sender.outbox_size.remote()) == 1  # a share leaves it kept
            ray_local.get(rank0.release.remote(payload))
            assert _outbox_empties(sender, ray_local), f"round {round_}: not let go after rank 0's release"
        assert ray_local.get(sender.opened.remote()) == [0, 0]  # one pair with each rank, made once
        assert ray_local.get(rank0.opened.remote()) == [1] and ray_local.get(rank1.opened.remote()) == [1]
        # released: a late share request finds the handoff gone (rank 0 would relay it)
        with pytest.raises(Exception, match="gone"):
            ray_local.get(rank1.share.remote(payload, wants, torch.float32))
    finally:
        for peer in (sender, rank0, rank1):
            ray_local.kill(peer)


def test_a_one_rank_receiver_lets_the_sender_go_at_once(ray_local):
    """Only a several-rank replica's rank 0 has the sender keep a handoff: a one-rank DiT's
    NCCL receive takes it out of the outbox as before."""
    sender, receiver = GlooPeer.remote("thinker"), GlooPeer.remote("dit")
    try:
        payload = ray_local.get(sender.send.remote("img2img"))
        assert ray_local.get(receiver.receive.remote(payload)) == ("nccl", digest(make_contexts("img2img", torch.bfloat16)))
        assert _outbox_empties(sender, ray_local)
    finally:
        for peer in (sender, receiver):
            ray_local.kill(peer)
