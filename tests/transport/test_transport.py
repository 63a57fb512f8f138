"""One send/receive contract for every KV transport backend (bagel_ray/transport).

Every backend in the registry must hand the receiver the same contexts, bit for bit: each CFG
branch's K/V, length and next RoPE position, and the image size, for text2img (cfg_img a cut of
gen) and img2img (cfg_img its own context), in bfloat16 and float32. Backends that cross
processes are also carried the way Ray carries them: pickle protocol 5 with out-of-band buffers,
and a real `ray.put` / `ray.get`. The GPU-direct backends (`auto`, `cuda_ipc`, `nccl`) run the
contract twice on CPU: pushing host contexts through the object store (what they do with a CPU
Thinker), and keeping them in the sender's outbox for the receiver to pull (the path of GPU
contexts; here sender and receiver share a process, so the pull takes the `local` route).
Routes between processes, with a real Ray actor as the sender, are in test_direct.py; the GPU
routes themselves in test_gpu.py.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from bagel_ray.engine.kv_context import Cut, ImageContexts, KVContext
from bagel_ray.transport.base import REGISTRY, KVTransport, TransferStats, make_transport
from bagel_ray.transport.direct import AutoTransport, DirectTransport
from bagel_ray.transport.routes import DirectPayload
from bagel_ray.transport.object_store import ObjectStoreTransport, PackedContexts
from tests.transport.peers import PULL_HOST_CONTEXTS, make_contexts

CPU = torch.device("cpu")
BRANCHES = ("cond", "cfg_text", "cfg_img")


def carry_direct(payload: Any, ray: Any) -> Any:
    return payload


def carry_pickle5(payload: Any, ray: Any) -> Any:
    """Pickle protocol 5 as Ray does it: packed KV travels out of band as one buffer, a
    GPU-direct payload carries no KV at all, and the in-band pickle is only metadata."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(payload, protocol=5, buffer_callback=buffers.append)
    if isinstance(payload, PackedContexts):
        assert len(buffers) == 1, "the KV should travel as one contiguous out-of-band buffer"
    else:
        assert isinstance(payload, DirectPayload) and not buffers, "a GPU-direct payload carries no KV"
    assert len(data) < 4096, f"{len(data)} bytes of in-band pickle: KV went in band"
    return pickle.loads(data, buffers=buffers)


def carry_ray(payload: Any, ray: Any) -> Any:
    return ray.get(ray.put(payload))


CARRIERS: dict[str, Callable[[Any, Any], Any]] = {"direct": carry_direct, "pickle5": carry_pickle5, "ray": carry_ray}


def contract_cases():
    for backend in sorted(REGISTRY):
        transport = make_transport(backend)
        for pull in (False, True) if isinstance(transport, DirectTransport) else (False,):
            for carrier in CARRIERS:
                if carrier != "direct" and not transport.crosses_processes:
                    continue
                yield pytest.param(backend, carrier, pull, id=f"{backend}{'-pull' if pull else ''}-{carrier}")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def assert_same_contexts(got: ImageContexts, sent: ImageContexts) -> None:
    assert (got.height, got.width) == (sent.height, sent.width)
    assert got.cfg_text == sent.cfg_text
    assert isinstance(got.cfg_img, Cut) == isinstance(sent.cfg_img, Cut)
    if isinstance(sent.cfg_img, Cut):
        assert got.cfg_img == sent.cfg_img
    for name in BRANCHES:
        a, b = got.branch(name), sent.branch(name)
        assert (a.length, a.rope) == (b.length, b.rope), name
        assert a.kv.dtype == b.kv.dtype and a.kv.shape == b.kv.shape and a.kv.device == b.kv.device, name
        assert torch.equal(bits(a.kv), bits(b.kv)), f"{name} K/V differ"
        assert got.same_as_gen(name) == sent.same_as_gen(name), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", ["text2img", "text2img_think", "img2img"])
@pytest.mark.parametrize("backend, carrier, pull", list(contract_cases()))
def test_send_receive_is_bit_identical(backend, carrier, pull, case, dtype, request):
    ray = request.getfixturevalue("ray_local") if carrier == "ray" else None
    transport = make_transport(backend)
    assert isinstance(transport, KVTransport) and transport.name == backend
    if pull:
        transport = type(transport)(PULL_HOST_CONTEXTS)
    sent = make_contexts(case, dtype)
    expected = {name: bits(sent.branch(name).kv).clone() for name in BRANCHES}

    payload = CARRIERS[carrier](transport.send(sent), ray)
    got, stats = transport.receive(payload, CPU)

    assert_same_contexts(got, sent)
    assert isinstance(stats, TransferStats)
    assert stats.nbytes == sent.nbytes == sum(c.nbytes for c in (sent.gen, sent.cfg_img) if isinstance(c, KVContext))
    assert stats.send_s >= 0 and stats.receive_s >= 0
    assert stats.route == ("local" if backend == "local" or pull else "object_store")
    # Sending did not touch the sender's tensors.
    for name in BRANCHES:
        assert torch.equal(bits(sent.branch(name).kv), expected[name]), name


@pytest.mark.parametrize("case", ["text2img", "img2img"])
def test_object_store_receive_is_zero_copy_after_ray_get(ray_local, case):
    """For a CPU destination, the received tensors are views of the numpy array ray.get hands
    out (object-store memory), not copies of it."""
    transport = ObjectStoreTransport()
    sent = make_contexts(case, torch.bfloat16)
    payload = ray_local.get(ray_local.put(transport.send(sent)))
    buf = payload.buffer
    # Ray maps it from the object store: read-only and not owned by the array.
    assert not buf.flags.writeable and not buf.flags.owndata
    assert buf.nbytes == sent.nbytes

    got, _ = transport.receive(payload, CPU)
    lo, hi = buf.ctypes.data, buf.ctypes.data + buf.nbytes
    own = [got.gen.kv] + ([got.cfg_img.kv] if isinstance(got.cfg_img, KVContext) else [])
    for t in own:
        start = t.data_ptr()
        assert lo <= start and start + t.numel() * t.element_size() <= hi, "received KV was copied"
    assert own[0].data_ptr() == lo


def test_a_pulled_handoff_is_taken_once():
    transport = AutoTransport(PULL_HOST_CONTEXTS)
    payload = transport.send(make_contexts("img2img", torch.float32))
    assert len(transport.sender.outbox) == 1
    transport.receive(payload, CPU)
    assert len(transport.sender.outbox) == 0
    from ray.exceptions import ActorUnavailableError

    with pytest.raises(ActorUnavailableError, match="gone"):  # HandoffGone: the driver retries the request
        transport.receive(payload, CPU)


@pytest.mark.parametrize("name", ["cuda_ipc", "nccl"])
def test_gpu_backends_without_cuda_warn_and_use_the_object_store(name, caplog):
    if torch.cuda.is_available():
        pytest.skip("this process has CUDA")
    with caplog.at_level(logging.WARNING, logger="bagel_ray.transport.base"):
        transport = make_transport(name)
    assert transport.name == name and transport.needs_cuda
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "bagel_ray.transport.base"]
    assert len(warnings) == 1
    assert name in warnings[0].getMessage() and "object store" in warnings[0].getMessage()
    payload = transport.send(make_contexts("text2img", torch.float32))
    assert isinstance(payload, PackedContexts)  # host contexts are pushed, as object_store does
    _, stats = transport.receive(payload, CPU)
    assert stats.route == "object_store"


def test_auto_needs_nothing_and_does_not_warn(caplog):
    with caplog.at_level(logging.WARNING):
        transport = make_transport("auto")
    assert transport.name == "auto" and not transport.needs_cuda
    assert transport.routes == frozenset({"cuda_ipc", "nccl"})
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_unknown_transport_raises():
    with pytest.raises(ValueError, match="carrier_pigeon"):
        make_transport("carrier_pigeon")


def test_object_store_64mb_pack_unpack_is_fast():
    """Not a benchmark: a 64 MB context packs and unpacks at memcpy speed, nowhere near
    seconds (a per-layer Python loop or a double copy through pageable memory would show)."""
    # 28 layers x 2 x 4 kv heads x 128 head_dim x 2 bytes = 57 KB per token: 1170 tokens ~ 64 MB.
    gen = KVContext(torch.zeros(28, 2, 1170, 4, 128, dtype=torch.bfloat16), rope=1100)
    sent = ImageContexts(gen, cfg_text=Cut(10, 10), cfg_img=gen.cut, height=1024, width=1024)
    assert sent.nbytes >= 64 * 10**6
    transport = ObjectStoreTransport()
    t0 = time.perf_counter()
    got, stats = transport.receive(carry_pickle5(transport.send(sent), None), CPU)
    elapsed = time.perf_counter() - t0
    assert stats.nbytes == sent.nbytes and got.gen.length == 1170
    assert elapsed < 5.0, f"64 MB object-store pack+unpack took {elapsed:.2f}s"
