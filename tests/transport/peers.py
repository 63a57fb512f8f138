"""Shared pieces of the transport tests: the contexts every test sends, Ray actors (and a
Serve deployment) that play the sending or receiving replica, a communicator that never
finishes (the peer that stalls), and one over gloo that moves the NCCL route's bytes on the
CPU. Workers import this module by name, so it holds no tests."""

from __future__ import annotations

import datetime
import hashlib
import importlib
import threading
import time
from typing import Any

import ray
import torch
import torch.distributed as dist

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


class GlooComm:
    """A `Communicator` over a two-rank gloo group of its own: the NCCL route's protocol and
    bytes, on the CPU (gloo stands in for NCCL). Connecting and each posted operation run in
    threads, as NCCL's non-blocking mode runs them on the GPU; `progress` polls them."""

    stream = None

    def __init__(self, host: str, port: int, store: dist.TCPStore | None, rank: int, timeout_s: float = 30.0) -> None:
        self._pg: dist.ProcessGroupGloo | None = None
        self._pending: list[threading.Event] = []
        self._error: BaseException | None = None
        self.aborted = False

        def connect() -> None:
            try:
                timeout = datetime.timedelta(seconds=timeout_s)
                own = store if store is not None else dist.TCPStore(host, port, 2, is_master=False, timeout=timeout)
                self._pg = dist.ProcessGroupGloo(own, rank, 2, timeout)
            except Exception as exc:  # noqa: BLE001 - seen through `progress`
                self._error = exc

        threading.Thread(target=connect, daemon=True).start()

    def progress(self) -> bool:
        if self.aborted:
            raise RuntimeError("the communicator was aborted")
        if self._error is not None:
            raise RuntimeError(f"the gloo pair failed: {self._error}")
        return self._pg is not None and all(done.is_set() for done in self._pending)

    def _post(self, work: Any) -> None:
        done = threading.Event()

        def wait() -> None:
            try:
                work.wait()
            except Exception as exc:  # noqa: BLE001 - seen through `progress`
                self._error = exc
            done.set()

        self._pending.append(done)
        threading.Thread(target=wait, daemon=True).start()

    def send(self, tensor: torch.Tensor, peer: int) -> None:
        self._post(self._pg.send([tensor], peer, 0))

    def recv(self, tensor: torch.Tensor, peer: int) -> None:
        self._post(self._pg.recv([tensor], peer, 0))

    def abort(self) -> None:
        self.aborted = True


class GlooComms:
    """Opens `GlooComm`s. The unique id is the address of a TCP store its maker (the receiver)
    keeps until it opens its own side; the sender connects to it."""

    available = True
    unavailable_reason = ""

    def __init__(self) -> None:
        self._stores: dict[bytes, dist.TCPStore] = {}
        self.opened: list[int] = []  # the rank of each communicator opened here

    def unique_id(self) -> bytes:
        store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=30))
        unique_id = f"127.0.0.1:{store.port}".encode().ljust(128, b"\0")
        self._stores[unique_id] = store
        return unique_id

    def open(self, unique_id: bytes, nranks: int, rank: int, device: torch.device) -> GlooComm:
        assert nranks == 2
        self.opened.append(rank)
        host, _, port = unique_id.rstrip(b"\0").decode().rpartition(":")
        return GlooComm(host, int(port), self._stores.pop(unique_id, None), rank)


@ray.remote(num_cpus=0, max_concurrency=4)
class GlooPeer:
    """Plays a replica whose contexts are "on a GPU" of its own (a fixed placement) with NCCL
    played by gloo: a Thinker that sends, or a rank of a DiT replica of `ranks` ranks that
    receives the whole handoff (rank 0) or its share (a worker rank)."""

    def __init__(self, gpu: str, ranks: int = 1) -> None:
        self.comms = GlooComms()
        placement = FixedPlacement(Placement("node", gpu, (gpu,), nccl=True))
        self.transport = AutoTransport(PULL_HOST_CONTEXTS, ranks=ranks, comms=self.comms, placement=placement)

    def send(self, case: str, dtype: torch.dtype = torch.bfloat16) -> Any:
        return self.transport.send(make_contexts(case, dtype))

    def receive(self, payload: Any) -> tuple[str, str]:
        contexts, stats = self.transport.receive(payload, torch.device("cpu"))
        return stats.route, digest(contexts)

    def share(self, payload: Any, wants: dict[str, tuple[int, int]], dtype: torch.dtype) -> tuple[str, int, dict] | None:
        """This rank's share through `fetch_share`, as a worker rank gets it: (route, bytes,
        branch -> (kv, rope)), or None."""
        from bagel_ray.transport.shares import fetch_share

        got = fetch_share(payload, wants, torch.device("cpu"), dtype, self.transport)
        if got is None:
            return None
        contexts, stats = got
        return stats.route, stats.nbytes, {b: (c.kv, c.rope) for b, c in contexts.items()}

    def release(self, payload: Any) -> None:
        self.transport.release(payload)

    def outbox_size(self) -> int:
        return len(self.transport.sender.outbox)

    def opened(self) -> list[int]:
        return list(self.comms.opened)


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
