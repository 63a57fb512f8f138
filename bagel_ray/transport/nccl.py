"""Point-to-point NCCL between two processes, every wait bounded by a deadline.

Each pair of replicas gets a two-rank communicator of its own (rank 0 sends, rank 1
receives), made when the pair first hands over contexts and aborted when a transfer on it
fails or times out. The communicator runs in NCCL's non-blocking mode: init and every send or
receive return at once and are polled (`await_progress`) until done or until the deadline,
when `ncclCommAbort` stops whatever is left on the device. Nothing here ever waits without a
deadline, so a peer that dies mid-handoff costs its partner at most the deadline.

Why our own binding of the NCCL library, and not one of the ready-made ones:

- `cupy.cuda.nccl.NcclCommunicator` (cupy-cuda12x/13x): its constructor calls the blocking
  `ncclCommInitRank` while holding the GIL (the call is not declared `nogil`), so a peer that
  vanishes between the handshake and its own init freezes the whole replica, event loop
  included, before any deadline can fire; and it has no `ncclCommInitRankConfig`, hence no
  non-blocking communicator to abort.
- `ray.util.collective`: static named groups that all members declare ahead (replicas come
  and go with autoscaling), built on that same cupy communicator, and no timeouts at all: a
  dead peer hangs the other side.
- Ray's GPU objects (`_tensor_transport="nccl"`, alpha in Ray 2.60): need a collective group
  made ahead over actor handles, move tensors between actor tasks rather than Serve replica
  calls, and cannot abort a NCCL transfer (`can_abort_transport` is False for it).

So this module binds the dozen lines of NCCL it needs through ctypes, which releases the GIL
in every call, from the `libnccl.so.2` already in the process (torch and cupy load it from
the nvidia-nccl wheel); vLLM's pynccl binds NCCL the same way. Tensors go to NCCL as raw
device pointers on a stream of the communicator's own, so a transfer overlaps with whatever
the default stream runs.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Protocol

import torch

log = logging.getLogger(__name__)

NCCL_SUCCESS = 0
NCCL_IN_PROGRESS = 7
NCCL_UINT8 = 1  # ncclUint8: every transfer moves bytes
NCCL_API_MAGIC = 0xCAFEBEEF
NCCL_CONFIG_VERSION = 21400  # NCCL_VERSION(2, 14, 0): the first ncclConfig_t, with `blocking`
MIN_NCCL_VERSION = 21400
SPLIT_NCCL_VERSION = 21800  # the first with ncclCommSplit


class TransferTimeout(TimeoutError):
    """A communicator did not finish its work before the deadline."""


class NcclError(RuntimeError):
    pass


class Communicator(Protocol):
    """One side of a two-rank communicator. `send` and `recv` post an operation and return;
    `progress` says whether everything posted so far (init included) has finished, and
    raises if the communicator failed; `abort` stops it for good. `stream` is the CUDA
    stream its operations run on (None off the GPU)."""

    stream: torch.cuda.Stream | None

    def progress(self) -> bool: ...

    def send(self, tensor: torch.Tensor, peer: int) -> None: ...

    def recv(self, tensor: torch.Tensor, peer: int) -> None: ...

    def abort(self) -> None: ...


class CommFactory(Protocol):
    @property
    def available(self) -> bool: ...

    @property
    def unavailable_reason(self) -> str: ...

    def unique_id(self) -> bytes: ...

    def open(self, unique_id: bytes, nranks: int, rank: int, device: torch.device) -> Communicator: ...


def _poll_pause(elapsed: float) -> float:
    """Spin (yielding the GIL) for the first 2 ms, then sleep in growing steps: a 500 MB
    transfer takes ~1.5 ms over NVLink, a stalled peer is only seen at the deadline anyway."""
    return 0.0 if elapsed < 2e-3 else 5e-5 if elapsed < 0.1 else 1e-3


def await_progress(comm: Communicator, deadline: float, check: Callable[[], None] | None = None,
                   what: str = "NCCL transfer", check_every_s: float = 2e-3) -> None:
    """Wait until `comm` has finished what was posted, or raise `TransferTimeout` at the
    `deadline` (time.monotonic). `check` runs every `check_every_s` while waiting and may
    raise to stop early (the peer said no, or died). The caller aborts the communicator."""
    start = last_check = time.monotonic()
    while not comm.progress():
        now = time.monotonic()
        if now >= deadline:
            raise TransferTimeout(f"{what} did not finish within {now - start:.2f}s")
        if check is not None and now - last_check >= check_every_s:
            last_check = now
            check()
        time.sleep(_poll_pause(now - start))


# -- the NCCL library through ctypes --------------------------------------------------------


class _UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_ubyte * 128)]


class _Config(ctypes.Structure):
    """The head of `ncclConfig_t` as NCCL 2.14 defined it. NCCL copies `size` bytes of it into
    its own, newer struct initialised with NCCL_CONFIG_INITIALIZER, and for a `version` below
    2.17 resets the later fields to their defaults (init.cc, parseCommConfig): only
    `blocking` is ours to set."""

    _fields_ = [("size", ctypes.c_size_t), ("magic", ctypes.c_uint), ("version", ctypes.c_uint), ("blocking", ctypes.c_int)]


def comm_config(blocking: bool) -> _Config:
    config = _Config()
    config.size = _Config.blocking.offset + ctypes.sizeof(ctypes.c_int)  # no trailing padding
    config.magic = NCCL_API_MAGIC
    config.version = NCCL_CONFIG_VERSION
    config.blocking = int(blocking)
    return config


def library_candidates() -> Iterator[str]:
    """Where libnccl.so.2 may be: already loaded (torch's CUDA build and cupy load it), on
    the loader path, in the nvidia-nccl wheel, next to torch's own libraries."""
    yield "libnccl.so.2"
    try:
        import nvidia.nccl  # the nvidia-nccl-cu12/cu13 wheel, a namespace package

        for root in nvidia.nccl.__path__:
            yield str(Path(root) / "lib" / "libnccl.so.2")
    except ImportError:
        pass
    yield str(Path(torch.__file__).parent / "lib" / "libnccl.so.2")


# NCCL settings this process's NCCL gets unless the environment sets them (read when NCCL first
# initialises, so applied before the library is loaded):
# - NCCL_GRAPH_MIXING_SUPPORT=0: NCCL then skips the events that let its operations mix with
#   CUDA graphs in other streams; we never capture NCCL in a graph, and without them a 500 MB
#   handoff was faster in each of four same-machine comparisons, by 0.01-0.11 ms of ~2 ms
#   (2x H100, 2x H200; benchmarks/RESULTS.md, "KV handoff").
NCCL_SETTINGS = {"NCCL_GRAPH_MIXING_SUPPORT": "0"}


def apply_nccl_settings(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set each of `NCCL_SETTINGS` that `environ` does not set already (a user's value wins)."""
    for name, value in NCCL_SETTINGS.items():
        environ.setdefault(name, value)


class NcclLibrary:
    def __init__(self, lib: ctypes.CDLL, path: str) -> None:
        c = ctypes
        self.lib, self.path = lib, path
        signatures = {
            "ncclGetVersion": [c.POINTER(c.c_int)],
            "ncclGetUniqueId": [c.POINTER(_UniqueId)],
            "ncclCommInitRankConfig": [c.POINTER(c.c_void_p), c.c_int, _UniqueId, c.c_int, c.POINTER(_Config)],
            "ncclCommGetAsyncError": [c.c_void_p, c.POINTER(c.c_int)],
            "ncclCommAbort": [c.c_void_p],
            "ncclSend": [c.c_void_p, c.c_size_t, c.c_int, c.c_int, c.c_void_p, c.c_void_p],
            "ncclRecv": [c.c_void_p, c.c_size_t, c.c_int, c.c_int, c.c_void_p, c.c_void_p],
        }
        for name, argtypes in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, c.c_int
        lib.ncclGetErrorString.argtypes, lib.ncclGetErrorString.restype = [c.c_int], c.c_char_p
        version = c.c_int()
        self.check(lib.ncclGetVersion(c.byref(version)), "ncclGetVersion")
        self.version = version.value
        if self.version < MIN_NCCL_VERSION:
            raise OSError(f"NCCL {self.version} at {path} has no non-blocking communicators (needs >= {MIN_NCCL_VERSION})")
        self.can_split = self.version >= SPLIT_NCCL_VERSION and hasattr(lib, "ncclCommSplit")
        if self.can_split:
            lib.ncclCommSplit.argtypes = [c.c_void_p, c.c_int, c.c_int, c.POINTER(c.c_void_p), c.POINTER(_Config)]
            lib.ncclCommSplit.restype = c.c_int

    @staticmethod
    def load() -> "NcclLibrary":
        apply_nccl_settings()
        errors = []
        for path in library_candidates():
            try:
                return NcclLibrary(ctypes.CDLL(path), path)
            except (OSError, AttributeError) as exc:
                errors.append(f"{path}: {exc}")
        raise OSError("no usable NCCL library: " + "; ".join(errors))

    def describe(self, result: int, call: str) -> str:
        text = self.lib.ncclGetErrorString(result)
        return f"{call} failed with NCCL error {result} ({text.decode() if text else 'unknown'})"

    def check(self, result: int, call: str) -> None:
        if result != NCCL_SUCCESS:
            raise NcclError(self.describe(result, call))

    def unique_id(self) -> bytes:
        uid = _UniqueId()
        self.check(self.lib.ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
        return bytes(uid.internal)


class NcclComm:
    """One rank of a two-rank NCCL communicator on `device`, with a stream of its own.

    Two communicators in fact, for two needs. Connecting must be abortable (a peer may never
    come), so the communicator is made in NCCL's non-blocking mode: init returns at once and
    `ncclCommAbort` stops it at any point. But a non-blocking communicator hands the launch
    of every group of operations to a thread that NCCL creates for it, on both sides' critical
    path of every handoff (posting on the blocking child made a 500 MB handoff 0.05-0.1 ms
    faster in each of three runs on H100s and H200s). So once connected,
    the pair splits a blocking child off it (`ncclCommSplit`, NCCL >= 2.18; the split itself
    runs in the parent's non-blocking mode, and aborting the parent stops it) and posts its
    transfers there, where a post only enqueues the kernel. The child's first transfer makes
    its connections and waits for the peer's matching post, which both sides make right after
    agreeing on the handoff; a peer that dies meanwhile breaks the sockets, which ends the
    wait with an error. Without `ncclCommSplit` transfers stay on the non-blocking parent.

    NCCL's rule for non-blocking communicators: after a call returns "in progress", poll
    `ncclCommGetAsyncError` until it says success before the next call. `progress` does that,
    and only then records a CUDA event behind the posted operation, so the event stands for
    the operation itself. Calls are serialised by a lock, so `abort` from another thread
    (closing the transport) never frees the communicator under a running call."""

    def __init__(self, nccl: NcclLibrary, unique_id: bytes, nranks: int, rank: int, device: torch.device,
                 blocking_transfers: bool = True) -> None:
        if device.type != "cuda":
            raise ValueError(f"NCCL needs a CUDA device, not {device}")
        self._nccl = nccl
        self.device = device
        self.rank = rank
        self.stream = torch.cuda.Stream(device)
        self._lock = threading.Lock()
        self._posted = False  # an operation was posted and its event is not recorded yet
        self._events: list[torch.cuda.Event] = []
        # the blocking child for transfers: "wanted", "splitting" (NULL until NCCL is done), "made" or "no"
        self._split = "wanted" if blocking_transfers and nccl.can_split else "no"
        self._child = ctypes.c_void_p()
        handle = ctypes.c_void_p()
        config = comm_config(blocking=False)
        with torch.cuda.device(device):
            result = nccl.lib.ncclCommInitRankConfig(ctypes.byref(handle), nranks, _UniqueId.from_buffer_copy(unique_id),
                                                     rank, ctypes.byref(config))
        self._handle: ctypes.c_void_p | None = handle if handle.value else None
        if result not in (NCCL_SUCCESS, NCCL_IN_PROGRESS):
            self.abort()
            raise NcclError(nccl.describe(result, "ncclCommInitRankConfig"))

    @property
    def blocking_transfers(self) -> bool:
        """Whether transfers go through the blocking child (known once connected)."""
        return self._split == "made"

    def progress(self) -> bool:
        with self._lock:
            if self._handle is None:
                raise NcclError("the communicator was aborted")
            if not self._settled(self._handle):
                return False
            if self._split == "wanted":  # connected: split the blocking child off (both ranks do)
                config = comm_config(blocking=True)
                with torch.cuda.device(self.device):
                    result = self._nccl.lib.ncclCommSplit(self._handle, 0, self.rank, ctypes.byref(self._child),
                                                          ctypes.byref(config))
                if result not in (NCCL_SUCCESS, NCCL_IN_PROGRESS):
                    raise NcclError(self._nccl.describe(result, "ncclCommSplit"))
                self._split = "splitting"
                return False
            if self._split == "splitting":
                if not self._child.value:
                    return False
                self._split = "made"
            if self._split == "made" and not self._settled(self._child):
                return False
            if self._posted:
                event = torch.cuda.Event()
                event.record(self.stream)
                self._events.append(event)
                self._posted = False
            while self._events and self._events[0].query():
                self._events.pop(0)
            return not self._events

    def _settled(self, handle: ctypes.c_void_p) -> bool:
        """False while `handle` has a non-blocking call in progress; raises on its error."""
        state = ctypes.c_int()
        self._nccl.check(self._nccl.lib.ncclCommGetAsyncError(handle, ctypes.byref(state)), "ncclCommGetAsyncError")
        if state.value == NCCL_IN_PROGRESS:
            return False
        self._nccl.check(state.value, "the communicator")
        return True

    def send(self, tensor: torch.Tensor, peer: int) -> None:
        self._post("ncclSend", tensor, peer)

    def recv(self, tensor: torch.Tensor, peer: int) -> None:
        self._post("ncclRecv", tensor, peer)

    def _post(self, call: str, tensor: torch.Tensor, peer: int) -> None:
        if not tensor.is_contiguous() or tensor.device != self.device:
            raise ValueError(f"{call} needs a contiguous tensor on {self.device}, got one on {tensor.device}")
        with self._lock:
            if self._handle is None:
                raise NcclError("the communicator was aborted")
            if self._posted:
                raise RuntimeError(f"{call} posted before the previous operation was seen through `progress`")
            if self._split not in ("made", "no"):
                raise RuntimeError(f"{call} posted before `progress` saw the communicator connected")
            handle = self._child if self._split == "made" else self._handle
            with torch.cuda.device(self.device):
                result = getattr(self._nccl.lib, call)(
                    ctypes.c_void_p(tensor.data_ptr()), tensor.numel() * tensor.element_size(), NCCL_UINT8, peer,
                    handle, ctypes.c_void_p(self.stream.cuda_stream))
            if result not in (NCCL_SUCCESS, NCCL_IN_PROGRESS):
                raise NcclError(self._nccl.describe(result, call))
            self._posted = True

    def abort(self) -> None:
        """Abort the child, then the parent (which also stops a split in progress)."""
        with self._lock:
            handles = [h for h in (self._child, self._handle) if h is not None and h.value]
            self._handle, self._child = None, ctypes.c_void_p()
            self._events.clear()
            for handle in handles:
                result = self._nccl.lib.ncclCommAbort(handle)
                if result not in (NCCL_SUCCESS, NCCL_IN_PROGRESS):
                    log.warning("%s", self._nccl.describe(result, "ncclCommAbort"))


class NcclComms:
    """Opens `NcclComm`s; loads the library on first use and remembers why it could not.
    `blocking_transfers=False` keeps transfers on the non-blocking parent (the benchmark's
    baseline)."""

    def __init__(self, blocking_transfers: bool = True) -> None:
        self.blocking_transfers = blocking_transfers
        self._lib: NcclLibrary | None = None
        self._reason = ""
        self._lock = threading.Lock()

    def _library(self) -> NcclLibrary | None:
        with self._lock:
            if self._lib is None and not self._reason:
                if not torch.cuda.is_available():
                    self._reason = "CUDA is not available in this process"
                else:
                    try:
                        self._lib = NcclLibrary.load()
                        log.info("NCCL %d loaded from %s", self._lib.version, self._lib.path)
                    except OSError as exc:
                        self._reason = str(exc)
            return self._lib

    @property
    def available(self) -> bool:
        return self._library() is not None

    @property
    def unavailable_reason(self) -> str:
        self._library()
        return self._reason

    def unique_id(self) -> bytes:
        lib = self._library()
        if lib is None:
            raise NcclError(f"NCCL is unavailable: {self._reason}")
        return lib.unique_id()

    def open(self, unique_id: bytes, nranks: int, rank: int, device: torch.device) -> NcclComm:
        lib = self._library()
        if lib is None:
            raise NcclError(f"NCCL is unavailable: {self._reason}")
        return NcclComm(lib, unique_id, nranks, rank, device, self.blocking_transfers)
