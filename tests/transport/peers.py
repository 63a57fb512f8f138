"""Shared pieces of the transport tests: the contexts every test sends, Ray actors (and a
Serve deployment) that play the sending or receiving replica, and a communicator that never
finishes (the peer that stalls). Workers import this module by name, so it holds no tests."""

from __future__ import annotations

import hashlib
import importlib
import threading
import time
from typing import Any

import ray
import torch

from bagel_ray.engine.kv_context import Cut, ImageContexts, KVContext
from bagel_ray.transport.base import REGISTRY
from bagel_ray.transport.direct import AutoTransport, DirectSettings, DirectTransport
from bagel_ray.transport.routes import Placement
from bagel_ray.transport.outbox import Outbox

LAYERS, KV_HEADS, HEAD_DIM = 3, 4, 64  # ~110 KB+ per context: above Ray's inline-object limit
# Host contexts kept in the sender's outbox to be pulled: the path of GPU contexts, on CPU.
PULL_HOST_CONTEXTS = DirectSettings(pull_host_contexts=True)


def kv(length: int, dtype: torch.dtype, seed: int, layers: int = LAYERS) -> torch.Tensor:
    """Random K/V with the bit patterns a careless cast or copy would change: NaN, ±inf, -0."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(layers, 2, length, KV_HEADS, HEAD_DIM, generator=g).to(dtype)
    t[0, 0, 0, 0, :4] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0], dtype=dtype)
    return t


@torch.inference_mode()
def make_contexts(case: str, dtype: torch.dtype, device: str | torch.device = "cpu", length: int = 41,
                  layers: int = LAYERS) -> ImageContexts:
    """Inference tensors, as the engines make them. rope != length: an image block takes one
    position for many rows."""
    gen = KVContext(kv(length, dtype, seed=0, layers=layers).to(device), rope=length - 14)
    if case == "text2img":  # cfg_img equals gen (no think): a cut
        return ImageContexts(gen, cfg_text=Cut(6, 6), cfg_img=gen.cut, height=512, width=384)
    if case == "text2img_think":  # cfg_img a shorter prefix of gen
        return ImageContexts(gen, cfg_text=Cut(6, 6), cfg_img=Cut(length - 8, length - 22), height=256, width=768)
    if case == "img2img":  # cfg_img its own context, prompt at other positions
        own = KVContext(kv(23, dtype, seed=1, layers=layers).to(device), rope=9)
        return ImageContexts(gen, cfg_text=Cut(length - 11, 16), cfg_img=own, height=1024, width=1024)
    raise ValueError(case)


def digest(contexts: ImageContexts) -> str:
    """Everything the receiver must get right, bit for bit, as one hash."""
    h = hashlib.sha256(repr((contexts.cfg_text, contexts.cfg_img if isinstance(contexts.cfg_img, Cut) else contexts.cfg_img.rope,
                             contexts.gen.rope, contexts.height, contexts.width)).encode())
    for t in [contexts.gen.kv] + ([contexts.cfg_img.kv] if isinstance(contexts.cfg_img, KVContext) else []):
        h.update(repr((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


class FixedPlacement:
    """A placement that claims a GPU (and NCCL) without one: makes the planner pick NCCL on CPU."""

    def __init__(self, placement: Placement) -> None:
        self.value = placement

    def __call__(self, device: torch.device) -> Placement:
        return self.value


class StalledComm:
    """A communicator whose work never finishes (a peer that stalls), or fails at once."""

    stream = None

    def __init__(self, log: list[str], fail: bool) -> None:
        self._log, self._fail = log, fail
        self.aborted = False

    def progress(self) -> bool:
        if self.aborted:
            raise RuntimeError("aborted")
        if self._fail:
            raise RuntimeError("the fake communicator failed")
        return False

    def send(self, tensor: torch.Tensor, peer: int) -> None:
        self._log.append("send")

    def recv(self, tensor: torch.Tensor, peer: int) -> None:
        self._log.append("recv")

    def abort(self) -> None:
        self.aborted = True
        self._log.append("abort")


class StalledComms:
    available = True
    unavailable_reason = ""

    def __init__(self, fail: bool = False) -> None:
        self.log: list[str] = []
        self.fail = fail

    def unique_id(self) -> bytes:
        return b"\x01" * 128

    def open(self, unique_id: bytes, nranks: int, rank: int, device: torch.device) -> StalledComm:
        self.log.append(f"open rank {rank}")
        return StalledComm(self.log, self.fail)


@ray.remote(num_cpus=0, max_concurrency=4)
class SenderActor:
    """Plays a Thinker replica on CPU: its contexts stay in its outbox for the receiver to pull."""

    def __init__(self, placement: Placement | None = None, stalled: bool = False) -> None:
        self.comms = StalledComms() if stalled else None
        self.transport = AutoTransport(PULL_HOST_CONTEXTS, comms=self.comms,
                                       placement=FixedPlacement(placement) if placement else None)

    def send(self, case: str, dtype: torch.dtype = torch.float32) -> Any:
        return self.transport.send(make_contexts(case, dtype))

    def outbox_size(self) -> int:
        return len(self.transport.sender.outbox)

    def set_outbox(self, max_bytes: int = 8 << 30, ttl_s: float = 600.0) -> None:
        self.transport.sender.outbox = Outbox(max_bytes, ttl_s)

    def comm_log(self) -> list[str]:
        return list(self.comms.log) if self.comms else []

    def block(self, seconds: float) -> None:
        """Occupy one of the actor's threads (all four: a replica that does not answer)."""
        time.sleep(seconds)


class SenderReplica:
    """Plays a Thinker replica behind Serve (`sender_deployment`): the receiver reaches
    exactly this replica."""

    def __init__(self) -> None:
        self.transport = AutoTransport(PULL_HOST_CONTEXTS)

    def send(self, case: str) -> Any:
        return self.transport.send(make_contexts(case, torch.float32))


def sender_deployment():
    from ray import serve

    return serve.deployment(SenderReplica, name="KVSender", ray_actor_options={"num_cpus": 0})


@ray.remote(num_cpus=0, max_concurrency=4)
class GpuPeer:
    """One side of a GPU handoff (tests/transport/test_gpu.py, benchmarks/kv_transfer.py)."""

    def __init__(self, transport: str, **options: Any) -> None:
        module, _, cls = REGISTRY[transport].partition(":")
        self.transport = getattr(importlib.import_module(module), cls)(**options)
        self.device = torch.device("cuda", 0)
        torch.cuda.set_device(self.device)
        self.held: threading.Event | None = None
        self.received_at = 0

    def gpu(self) -> str:
        return str(torch.cuda.get_device_properties(self.device).uuid)

    def key(self) -> str:
        return self.transport.key

    def send(self, case: str, dtype: torch.dtype = torch.bfloat16, length: int = 41, layers: int = LAYERS) -> Any:
        return self.transport.send(make_contexts(case, dtype, self.device, length, layers))

    def receive(self, payload: Any) -> tuple[str, str, float]:
        """(route, digest of what arrived, seconds)."""
        t0 = time.perf_counter()
        contexts, stats = self.transport.receive(payload, self.device)
        torch.cuda.synchronize(self.device)
        self.received_at = contexts.gen.kv.data_ptr()
        return stats.route, digest(contexts), time.perf_counter() - t0

    def received_into(self) -> tuple[int, int | None]:
        """Where the last receive put the contexts, and where this receiver's spare buffer is
        (None without one)."""
        spare = self.transport.receiver.spare
        return self.received_at, None if spare is None else spare.data_ptr()

    def hold_pair(self, receiver_key: str, seconds: float) -> None:
        """Keep the pair with `receiver_key` busy for `seconds` (a send that cannot start)."""
        assert isinstance(self.transport, DirectTransport)

        def hold() -> None:
            with self.transport.sender.links.pair(receiver_key, time.monotonic() + 5):
                time.sleep(seconds)

        threading.Thread(target=hold, daemon=True).start()
        time.sleep(0.05)

    def links(self) -> tuple[int, int]:
        return len(self.transport.receiver.links), len(self.transport.sender.links)
