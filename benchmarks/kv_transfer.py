"""KV handoff bandwidth: the raw links, then each transport end to end between two Ray actors
that play a Thinker replica and a DiT replica.

    python3 -m benchmarks.kv_transfer [--sizes 5,100,500,1000] [--reps 10] [--json FILE] [--write-results]

(a) Raw links, no Ray: a plain two-process cupy NCCL send/recv between GPU 0 and GPU 1 (our
    own NCCL binding when cupy is not installed), how long a torch CUDA IPC handle of a fresh
    tensor takes to become usable in another process on the same GPU, and a device-to-device
    copy on one GPU (and GPU 0 -> GPU 1) for scale.
(b) Each transport end to end between two actors: the sender's `send` (packing), the payload
    through the object store (`ray.put` in the sender, `ray.get` in the receiver: the KV itself
    for `object_store`, a few hundred bytes for the GPU-direct payloads: "carry"), and the
    receiver's `receive` (signalling the sender, the transfer, unpacking), until the contexts
    are on the receiver's GPU. Two figures: the handoff (send + receive: packing, signalling,
    transfer, unpacking) and the total with the carry. For the GPU-direct routes the carry is
    the request's own trip from the Thinker to the DiT, which a Serve request makes whatever
    the transport; for `object_store` it is the transfer itself, so its target is on the total.
    Request routing by the driver is not counted: the same for every transport. Same GPU: `object_store`, `cuda_ipc`, `auto`; two GPUs:
    `object_store`, `nccl`, `auto`. The first handoff of a pair (NCCL connect) is warm-up, shown
    apart. Every path is checked bit for bit once per size.

Contexts have BAGEL-7B's layout (28 layers x K/V x 4 KV heads x 128, bf16: 57,344 bytes a
token); sizes are in MB of 10^6 bytes. Figures are medians. `--write-results` puts the tables
into benchmarks/RESULTS.md between its kv_transfer markers.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

LAYERS, KV_HEADS, HEAD_DIM = 28, 4, 128
TOKEN_BYTES = LAYERS * 2 * KV_HEADS * HEAD_DIM * 2
RESULTS = Path(__file__).with_name("RESULTS.md")
BEGIN, END = "<!-- kv_transfer:begin -->", "<!-- kv_transfer:end -->"
TARGETS = {  # (path, MB): (what, met?, on the handoff (True) or the total with the carry)
    ("nccl", 500): (">= 250 GB/s", lambda ms, gbs: gbs >= 250, True),
    ("cuda_ipc", 500): ("<= 5 ms", lambda ms, gbs: ms <= 5, True),
    ("object_store", 500): ("<= 150 ms", lambda ms, gbs: ms <= 150, False),
}


NON_BLOCKING = "nccl, non-blocking posts"  # the NCCL route with `blocking_transfers=False`, for comparison


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


# -- (a) raw links ---------------------------------------------------------------------------


def _nccl_rank(rank: int, backend: str, uid_queue, results, sizes: list[int], reps: int) -> None:
    """One rank of the raw NCCL measurement: GPU `rank`, rank 0 sends, rank 1 receives; a
    one-element all-reduce lines the ranks up before every timed transfer."""
    try:
        if backend == "cupy":
            import cupy
            from cupy.cuda import nccl

            cupy.cuda.Device(rank).use()
            if rank == 0:
                uid = nccl.get_unique_id()
                uid_queue.put(uid)
            else:
                uid = uid_queue.get()
            comm = nccl.NcclCommunicator(2, uid, rank)
            stream = cupy.cuda.Stream(non_blocking=True)
            flag = cupy.zeros(1, dtype=cupy.float32)

            def barrier() -> None:
                comm.allReduce(flag.data.ptr, flag.data.ptr, 1, nccl.NCCL_FLOAT32, nccl.NCCL_SUM, stream.ptr)
                stream.synchronize()

            def transfer(buf, n: int) -> None:
                if rank == 0:
                    comm.send(buf.data.ptr, n, nccl.NCCL_UINT8, 1, stream.ptr)
                else:
                    comm.recv(buf.data.ptr, n, nccl.NCCL_UINT8, 0, stream.ptr)
                stream.synchronize()

            def alloc(n: int):
                return cupy.empty(n, dtype=cupy.uint8)
        else:  # our binding
            from bagel_ray.transport.nccl import NcclComms, await_progress

            comms, device = NcclComms(), torch.device("cuda", rank)
            torch.cuda.set_device(device)
            if rank == 0:
                uid = comms.unique_id()
                uid_queue.put(uid)
            else:
                uid = uid_queue.get()
            comm = comms.open(uid, 2, rank, device)
            await_progress(comm, time.monotonic() + 120)
            one = torch.zeros(1, dtype=torch.uint8, device=device)

            def barrier() -> None:
                (comm.send if rank == 0 else comm.recv)(one, 1 - rank)
                await_progress(comm, time.monotonic() + 60)

            def transfer(buf, n: int) -> None:
                (comm.send if rank == 0 else comm.recv)(buf, 1 - rank)
                await_progress(comm, time.monotonic() + 60)

            def alloc(n: int):
                return torch.empty(n, dtype=torch.uint8, device=device)
        for mb in sizes:
            n = mb * 10**6
            buf = alloc(n)
            for _ in range(3):
                barrier()
                transfer(buf, n)
            times = []
            for _ in range(reps):
                barrier()
                t0 = time.perf_counter()
                transfer(buf, n)
                times.append(time.perf_counter() - t0)
            if rank == 1:
                results.put((mb, statistics.median(times)))
            del buf
        if rank == 1:
            results.put(None)
    except BaseException as exc:  # reported by the parent
        results.put(("error", f"rank {rank}: {type(exc).__name__}: {exc}"))


def raw_nccl(sizes: list[int], reps: int) -> tuple[str, dict[int, float]]:
    try:
        from cupy.cuda import nccl  # noqa: F401

        backend = "cupy"
    except Exception:
        backend = "bagel_ray.transport.nccl"
    ctx = mp.get_context("spawn")
    uid_queue, results = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_nccl_rank, args=(r, backend, uid_queue, results, sizes, reps)) for r in (0, 1)]
    for p in procs:
        p.start()
    out: dict[int, float] = {}
    while True:
        item = results.get(timeout=600)
        if item is None:
            break
        if item[0] == "error":
            raise RuntimeError(item[1])
        out[item[0]] = item[1]
    for p in procs:
        p.join(timeout=60)
    return backend, out


def _ipc_child(conn) -> None:
    torch.cuda.set_device(0)
    torch.zeros(1, device="cuda:0")  # CUDA ready before the first timing
    while (handle := conn.recv()) is not None:
        rebuild, args = handle
        t0 = time.perf_counter()
        tensor = rebuild(*args)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        del tensor
        conn.send(elapsed)


def raw_ipc(sizes: list[int], reps: int) -> dict[int, float]:
    """Seconds until a CUDA IPC handle of a fresh tensor is usable in another process."""
    from torch.multiprocessing.reductions import reduce_tensor

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_ipc_child, args=(child,))
    proc.start()
    out = {}
    for mb in sizes:
        times, keep = [], []
        for i in range(reps + 2):
            tensor = torch.empty(mb * 10**6, dtype=torch.uint8, device="cuda:0")  # a new allocation each time
            keep.append(tensor)
            torch.cuda.synchronize()
            parent.send(reduce_tensor(tensor))
            elapsed = parent.recv()
            if i >= 2:
                times.append(elapsed)
        out[mb] = statistics.median(times)
        del keep
        torch.cuda.empty_cache()
    parent.send(None)
    proc.join(timeout=60)
    return out


def raw_copy(sizes: list[int], reps: int, dst: str) -> dict[int, float]:
    out = {}
    for mb in sizes:
        src = torch.empty(mb * 10**6, dtype=torch.uint8, device="cuda:0")
        target = torch.empty_like(src, device=dst)
        times = []
        for i in range(reps + 2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            target.copy_(src)
            torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        out[mb] = statistics.median(times)
        del src, target
        torch.cuda.empty_cache()
    return out


# -- (b) transports end to end ------------------------------------------------------------------


def stage_class():
    import ray

    @ray.remote(num_cpus=1, max_concurrency=4)
    class Stage:
        """A Thinker (sender) or DiT (receiver) replica's transport on its GPU."""

        def __init__(self, transport: str) -> None:
            from bagel_ray.transport.base import make_transport

            self.device = torch.device("cuda", 0)
            torch.cuda.set_device(self.device)
            if transport == NON_BLOCKING:  # the baseline: transfers posted on the non-blocking communicator
                from bagel_ray.transport.direct import NcclTransport
                from bagel_ray.transport.nccl import NcclComms

                self.transport = NcclTransport(comms=NcclComms(blocking_transfers=False))
            else:
                self.transport = make_transport(transport)
            self.contexts = None

        def gpu(self) -> str:
            return str(torch.cuda.get_device_properties(self.device).uuid)

        @torch.inference_mode()  # as the engines make them
        def contexts_of(self, nbytes: int, seed: int):
            from bagel_ray.engine.kv_context import Cut, ImageContexts, KVContext

            tokens = max(1, round(nbytes / TOKEN_BYTES))
            g = torch.Generator(device=self.device).manual_seed(seed)
            raw = torch.randint(0, 256, (tokens * TOKEN_BYTES,), dtype=torch.uint8, device=self.device, generator=g)
            gen = KVContext(raw.view(torch.bfloat16).view(LAYERS, 2, tokens, KV_HEADS, HEAD_DIM), rope=tokens)
            return ImageContexts(gen, Cut(min(10, tokens), min(10, tokens)), gen.cut, 1024, 1024)

        def prepare(self, nbytes: int, seed: int) -> int:
            self.contexts = None
            torch.cuda.empty_cache()
            self.contexts = self.contexts_of(nbytes, seed)
            torch.cuda.synchronize()
            return self.contexts.nbytes

        def sender_marks(self, receive_start: float) -> dict[str, float]:
            """When this sender saw the last send request and posted its NCCL send, in seconds
            after the receiver began `receive` (perf_counter is one clock for the whole host)."""
            return {name: t - receive_start for name, t in self.transport.sender.send_marks.items()}

        def last_receive_start(self) -> float:
            return self.receive_start

        def send(self) -> tuple[list, float, float]:
            import ray

            t0 = time.perf_counter()
            payload = self.transport.send(self.contexts)
            t1 = time.perf_counter()
            ref = ray.put(payload)
            return [ref], t1 - t0, time.perf_counter() - t1

        def receive(self, refs: list, verify_seed: int | None) -> tuple[str, float, float, bool | None, tuple]:
            import ray

            t0 = time.perf_counter()
            payload = ray.get(refs[0])
            t1 = self.receive_start = time.perf_counter()
            contexts, stats = self.transport.receive(payload, self.device)
            torch.cuda.synchronize(self.device)
            t2 = time.perf_counter()
            same = None
            if verify_seed is not None:
                want = self.contexts_of(contexts.nbytes, verify_seed)
                same = (torch.equal(contexts.gen.kv.view(torch.uint8), want.gen.kv.view(torch.uint8))
                        and contexts.gen.rope == want.gen.rope and contexts.cfg_text == want.cfg_text)
            del contexts, payload
            return stats.route, t1 - t0, t2 - t1, same, stats.phases

    return Stage


def end_to_end(transport: str, same_gpu: bool, sizes: list[int], reps: int) -> list[dict]:
    import ray

    Stage = stage_class()
    share = 0.5 if same_gpu else 1
    sender = Stage.options(num_gpus=share).remote(transport)
    receiver = Stage.options(num_gpus=share).remote(transport)
    rows = []
    try:
        a, b = ray.get([sender.gpu.remote(), receiver.gpu.remote()])
        if (a == b) != same_gpu:
            print(f"  skipped {transport}: Ray placed the actors on {'two GPUs' if same_gpu else 'one GPU'}", file=sys.stderr)
            return rows
        for i, mb in enumerate(sizes):
            seed = 1000 + i
            nbytes = ray.get(sender.prepare.remote(mb * 10**6, seed))
            samples, first = [], None
            for rep in range(reps + 2):
                refs, send_s, put_s = ray.get(sender.send.remote())
                route, get_s, receive_s, same, phases = ray.get(receiver.receive.remote(refs, seed if rep == 0 else None))
                if route == "nccl":  # where the sender's side of the handoff sat on the receiver's clock
                    marks = ray.get(sender.sender_marks.remote(ray.get(receiver.last_receive_start.remote())))
                    phases = tuple(phases) + tuple((f"sender {name}", t) for name, t in marks.items())
                if same is False:
                    raise AssertionError(f"{transport} {mb} MB: the received contexts differ from the sent ones")
                total = send_s + put_s + get_s + receive_s
                if rep == 0:
                    first = total
                if rep >= 2:
                    samples.append((send_s + receive_s, total, send_s, put_s + get_s, receive_s, route, phases))
            med = sorted(samples, key=lambda x: x[0])[len(samples) // 2]
            handoff, total, send_s, carry_s, receive_s, route, _ = med
            phases = {name: statistics.median(dict(x[6]).get(name, 0.0) for x in samples) * 1e3 for name, _ in med[6]}
            sender_ms = {name[len("sender "):]: phases.pop(name) for name in list(phases) if name.startswith("sender ")}
            rows.append({"transport": transport, "gpus": "same GPU" if same_gpu else "two GPUs", "mb": mb, "nbytes": nbytes,
                         "route": route, "handoff_ms": handoff * 1e3, "handoff_gbps": gbps(nbytes, handoff),
                         "ms": statistics.median(x[1] for x in samples) * 1e3,
                         "gbps": gbps(nbytes, statistics.median(x[1] for x in samples)), "send_ms": send_s * 1e3,
                         "carry_ms": carry_s * 1e3, "receive_ms": receive_s * 1e3, "phases_ms": phases,
                         "sender_ms": sender_ms, "first_ms": first * 1e3})
            print(f"  {transport:12s} {rows[-1]['gpus']:9s} {mb:5d} MB  handoff {handoff * 1e3:8.2f} ms "
                  f"{rows[-1]['handoff_gbps']:7.1f} GB/s  with carry {rows[-1]['ms']:8.2f} ms  via {route}  {phases} {sender_ms}",
                  file=sys.stderr)
    finally:
        ray.kill(sender)
        ray.kill(receiver)
        time.sleep(1.0)  # the GPUs are free again before the next pair asks for them
    return rows


# -- report ------------------------------------------------------------------------------------


def environment() -> str:
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    parts = [f"{torch.cuda.device_count()}x {names}", f"torch {torch.__version__}"]
    try:
        import cupy

        parts.append(f"cupy {cupy.__version__}")
    except Exception:
        pass
    try:
        from bagel_ray.transport.nccl import NcclLibrary

        parts.append(f"NCCL {NcclLibrary.load().version}")
    except OSError:
        pass
    try:
        import ray

        parts.append(f"Ray {ray.__version__}")
    except ImportError:
        pass
    parts.append(f"Python {platform.python_version()}")
    return ", ".join(parts)


def tables(raw: dict, rows: list[dict], command: str) -> str:
    lines = [f"Device: {environment()}, {time.strftime('%Y-%m-%d')}.", f"Command: `{command}`", "",
             "Raw links (no Ray): time of one transfer, or until an IPC handle is usable.", "",
             "| link | " + " | ".join(f"{mb} MB" for mb in raw["sizes"]) + " |", "|---|" + "---:|" * len(raw["sizes"])]
    for name, values in raw["links"].items():
        cells = []
        for mb in raw["sizes"]:
            s = values.get(mb)
            cells.append("" if s is None else f"{s * 1e3:.3f} ms, {gbps(mb * 10**6, s):.0f} GB/s")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Transports end to end between two actors, contexts on the receiver's GPU. Handoff = send + receive "
              "(packing, signalling, transfer, unpacking); with carry = plus the payload's trip through the object "
              "store (the KV itself for object_store, a few hundred bytes otherwise). Medians; receive phases of the "
              "NCCL route (ms): plan = route chosen, ask = request sent, alloc = receive buffers allocated, post = "
              "receive posted, answer = the sender's answer read, transfer, handover = given to the engine's stream; "
              "then, in brackets, when the sender saw the request and posted its send (ms after the receive began); "
              "first = the pair's first handoff (with carry).", "",
              "| transport | GPUs | size | route | handoff | GB/s | with carry | GB/s | send / carry / receive | "
              "receive phases | first | target |",
              "|---|---|---:|---|---:|---:|---:|---:|---|---|---:|---|"]
    for r in rows:
        target = TARGETS.get((r["route"], r["mb"])) if r["transport"] != NON_BLOCKING else None
        verdict = ""
        if target:
            ms, gbs = (r["handoff_ms"], r["handoff_gbps"]) if target[2] else (r["ms"], r["gbps"])
            verdict = f"{target[0]} ({'handoff' if target[2] else 'with carry'}): {'**met**' if target[1](ms, gbs) else 'missed'}"
        phases = " / ".join(f"{v:.2f}" for v in r.get("phases_ms", {}).values())
        if r.get("sender_ms"):
            phases += " (" + " / ".join(f"{v:.2f}" for v in r["sender_ms"].values()) + ")"
        lines.append(f"| {r['transport']} | {r['gpus']} | {r['mb']} MB | {r['route']} | {r['handoff_ms']:.2f} ms | "
                     f"{r['handoff_gbps']:.1f} | {r['ms']:.2f} ms | {r['gbps']:.1f} | "
                     f"{r['send_ms']:.2f} / {r['carry_ms']:.2f} / {r['receive_ms']:.2f} ms | {phases} | "
                     f"{r['first_ms']:.1f} ms | {verdict} |")
    return "\n".join(lines)


def write_results(text: str) -> None:
    body = RESULTS.read_text()
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in body and END in body:
        body = body[: body.index(BEGIN)] + block + body[body.index(END) + len(END):]
    else:
        body = body.rstrip() + f"\n\n## KV handoff (`python3 -m benchmarks.kv_transfer`)\n\n{block}\n"
    RESULTS.write_text(body)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="5,100,500,1000", help="context sizes in MB (10^6 bytes)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--skip-raw", action="store_true")
    ap.add_argument("--transports", default="object_store,cuda_ipc,auto,nccl-nonblocking,nccl",
                    help="which transports to run end to end (comma-separated; nccl-nonblocking: the NCCL route "
                         "posting on the non-blocking communicator)")
    ap.add_argument("--json", help="write every measurement to this file")
    ap.add_argument("--write-results", action="store_true", help="record the tables in benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("kv_transfer needs a GPU")
    sizes = [int(s) for s in args.sizes.split(",")]
    gpus = torch.cuda.device_count()
    command = " ".join(["python3 -m benchmarks.kv_transfer", *(sys.argv[1:] if argv is None else argv)])

    raw: dict = {"sizes": sizes, "links": {}}
    if not args.skip_raw:
        print("raw links ...", file=sys.stderr)
        raw["links"]["copy, one GPU"] = raw_copy(sizes, args.reps, "cuda:0")
        raw["links"]["CUDA IPC open, one GPU"] = raw_ipc(sizes, args.reps)
        if gpus >= 2:
            raw["links"]["copy, GPU 0 -> GPU 1"] = raw_copy(sizes, args.reps, "cuda:1")
            backend, times = raw_nccl(sizes, args.reps)
            raw["links"][f"NCCL send/recv, GPU 0 -> GPU 1 ({backend})"] = times
        torch.cuda.empty_cache()

    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    rows: list[dict] = []
    print("transports end to end ...", file=sys.stderr)
    wanted = {NON_BLOCKING if name == "nccl-nonblocking" else name for name in args.transports.split(",")}
    for transport in ("object_store", "cuda_ipc", "auto"):
        if transport in wanted:
            rows += end_to_end(transport, True, sizes, args.reps)
    if gpus >= 2:
        for transport in ("object_store", NON_BLOCKING, "nccl", "auto"):
            if transport in wanted:
                rows += end_to_end(transport, False, sizes, args.reps)
    ray.shutdown()

    text = tables(raw, rows, command)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": environment(), "raw": {k: {str(mb): s for mb, s in v.items()}
                                               for k, v in raw["links"].items()}, "transports": rows}, indent=2))
    if args.write_results:
        write_results(text)
        print(f"\nwritten to {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
