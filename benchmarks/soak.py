"""Soak: the tiny app on a three-node cluster of one machine (benchmarks/multinode.py: a head,
a thinker node, two DiT nodes) under bounded mixed load for N minutes, with every replica's
memory and open file descriptors sampled.

    python -m benchmarks.soak --minutes 10            (from the repository root; ~1 GB of RAM)

Load: `--clients` closed-loop clients (each sends its next request when its last one is
answered, so at most that many are in flight), cycling through text, text streams, images,
image streams, edits and streams the client hangs up on after the first event. Each kind has
a few fixed, seeded variants, so every answer to a variant must equal the first one: an answer
mixed up with another request's, cut short or missing is caught, and each request must get
exactly one answer (a stream: one final chunk and one `[DONE]`).

Bounds (exit 1 past any; the summary JSON says which): no request lost, duplicated, mixed up
or failed; per replica, resident memory at the end at most `--rss-growth-mb` above its level
after warm-up (the median of the samples of the first `--warmup-frac` of the run), and open
file descriptors at most `--fd-growth` above it. The replicas must be the same processes
throughout (a restarted replica would hide a leak).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
from PIL import Image

KINDS = ("text", "text_stream", "image", "image_stream", "edit", "disconnect")
VARIANTS = 3  # seeded variants of each kind


@dataclass
class Ledger:
    """Every request sent and the answers it got. `digest` is what the answer must equal for
    every request of the same variant."""

    first: dict[tuple[str, int], str] = field(default_factory=dict)
    answers: dict[int, list[str]] = field(default_factory=dict)
    sent: int = 0
    mixed_up: list[int] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def open(self) -> int:
        with self.lock:
            self.sent += 1
            self.answers[self.sent] = []
            return self.sent

    def answer(self, request_id: int, variant: tuple[str, int], digest: str) -> None:
        with self.lock:
            self.answers[request_id].append(digest)
            want = self.first.setdefault(variant, digest)
            if digest != want:
                self.mixed_up.append(request_id)

    def fail(self, request_id: int, why: str) -> None:
        with self.lock:
            self.answers[request_id].append("failed")
            self.failed.append((request_id, why))

    def problems(self) -> dict[str, int]:
        lost = sum(1 for a in self.answers.values() if not a)
        duplicated = sum(1 for a in self.answers.values() if len(a) > 1)
        return {"lost": lost, "duplicated": duplicated, "mixed_up": len(self.mixed_up), "failed": len(self.failed)}


def growth(samples: list[float], warmup: int) -> float:
    """The last sample's excess over the median of the first `warmup` samples."""
    base = statistics.median(samples[:max(1, warmup)])
    return samples[-1] - base


def digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
    return h.hexdigest()[:16]


def picture() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def sse(resp: requests.Response, hang_up: bool = False) -> list:
    events = []
    for line in resp.iter_lines():
        if line.startswith(b"data: "):
            data = line[6:]
            events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
            if hang_up:
                break
    return events


def one_request(url: str, kind: str, v: int, edit_png: bytes) -> str | None:
    """Send one request of `kind`, variant `v`; the digest of its answer (None: hung up on
    purpose). Raises on anything but a complete, successful answer."""
    chat = f"{url}/v1/chat/completions"
    image_knobs = {"size": "32x32", "num_inference_steps": 4 + v, "seed": v, "cfg_interval": [0.0, 1.0]}
    if kind == "text":
        resp = requests.post(chat, json={"messages": [{"role": "user", "content": f"soak {v}"}], "max_tokens": 16, "seed": v}, timeout=120)
        resp.raise_for_status()
        return digest(resp.json()["choices"][0]["message"]["content"])
    if kind == "image":
        resp = requests.post(f"{url}/v1/images/generations", json={"prompt": f"soak {v}", **image_knobs}, timeout=120)
        resp.raise_for_status()
        return digest(resp.json()["data"][0]["b64_json"])
    if kind == "edit":
        resp = requests.post(f"{url}/v1/images/edits", files={"image": ("in.png", edit_png, "image/png")},
                             data={"prompt": f"soak {v}", "num_inference_steps": str(3 + v), "seed": str(v)}, timeout=120)
        resp.raise_for_status()
        return digest(resp.json()["data"][0]["b64_json"])
    if kind == "text_stream":
        body = {"messages": [{"role": "user", "content": f"soak {v}"}], "max_tokens": 16, "seed": v, "stream": True}
    else:  # image_stream, disconnect
        body = {"messages": [{"role": "user", "content": f"soak {v}"}], "modalities": ["image"], "stream": True, **image_knobs}
        if kind == "disconnect":
            body["num_inference_steps"] = 200  # still denoising when the client hangs up
    with requests.post(chat, json=body, stream=True, timeout=120) as resp:
        resp.raise_for_status()
        events = sse(resp, hang_up=kind == "disconnect")
    if kind == "disconnect":
        return None
    finals = [e for e in events[:-1] if e["choices"][0].get("finish_reason")]
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    if errors or events[-1] != "[DONE]" or len(finals) != 1:
        raise RuntimeError(f"stream ended badly: {len(finals)} final chunks, errors {errors}, last {events[-1]!r}")
    if kind == "text_stream":
        return digest("".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]))
    return digest(finals[0]["choices"][0]["delta"]["content"][-1]["image_url"]["url"])


def client(url: str, index: int, until: float, ledger: Ledger, edit_png: bytes) -> None:
    n = index
    while time.monotonic() < until:
        kind, v = KINDS[n % len(KINDS)], (n // len(KINDS)) % VARIANTS
        n += 1
        rid = ledger.open()
        try:
            got = one_request(url, kind, v, edit_png)
        except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
            ledger.fail(rid, f"{kind}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        if got is None:
            ledger.answer(rid, (kind, v), "hung-up")
        else:
            ledger.answer(rid, (kind, v), got)


def sample(app) -> dict[str, dict]:
    """Per live replica (by actor name): pid, resident memory (MB) and open descriptors."""
    out = {}
    for deployment in ("Driver", "Thinker", "DiT"):
        for r in app.replicas(deployment):
            pid = r["pid"]
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                rss_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
                fds = len(os.listdir(f"/proc/{pid}/fd"))
            except (OSError, StopIteration):
                continue
            out[r["actor_name"]] = {"deployment": deployment, "pid": pid, "rss_mb": rss_kb / 1024, "fds": fds}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--sample-every", type=float, default=10.0, metavar="S")
    p.add_argument("--warmup-frac", type=float, default=0.2, help="share of the run whose samples set the baseline")
    p.add_argument("--rss-growth-mb", type=float, default=64.0)
    p.add_argument("--fd-growth", type=int, default=16)
    p.add_argument("--json", type=Path, help="write the summary here too")
    args = p.parse_args(argv)

    from benchmarks import multinode

    scratch = None if os.environ.get("BAGEL_RAY_CACHE") else tempfile.TemporaryDirectory(prefix="bagel-soak-")
    cache = Path(os.environ["BAGEL_RAY_CACHE"] if scratch is None else scratch.name)  # the tiny model, made on first use
    print(f"soak: starting a head, a thinker node and two DiT nodes (cache {cache})", flush=True)
    app = multinode.start(cache)
    try:
        ledger = Ledger()
        until = time.monotonic() + args.minutes * 60
        edit_png = picture()
        threads = [threading.Thread(target=client, args=(app.url, i, until, ledger, edit_png), daemon=True) for i in range(args.clients)]
        for t in threads:
            t.start()
        series: dict[str, list[dict]] = {}
        started = time.monotonic()
        while any(t.is_alive() for t in threads):
            for name, s in sample(app).items():
                series.setdefault(name, []).append(s)
            so_far = ledger.problems()
            so_far["in_flight"] = so_far.pop("lost")  # unanswered yet
            print(f"soak: {time.monotonic() - started:5.0f}s, {ledger.sent} requests, {so_far}", flush=True)
            time.sleep(min(args.sample_every, max(0.0, until - time.monotonic()) + 1))
        for t in threads:
            t.join()
        for name, s in sample(app).items():
            series.setdefault(name, []).append(s)
    finally:
        multinode.stop(app)
        if scratch is not None:
            scratch.cleanup()

    replicas, over = {}, []
    for name, points in series.items():
        warm = max(1, int(len(points) * args.warmup_frac))
        rss = growth([p["rss_mb"] for p in points], warm)
        fds = growth([p["fds"] for p in points], warm)
        pids = sorted({p["pid"] for p in points})
        replicas[name] = {"deployment": points[0]["deployment"], "samples": len(points), "pids": pids,
                          "rss_mb_end": round(points[-1]["rss_mb"], 1), "rss_growth_mb": round(rss, 1),
                          "fds_end": points[-1]["fds"], "fd_growth": fds}
        if rss > args.rss_growth_mb or fds > args.fd_growth or len(pids) > 1:
            over.append(name)
    problems = ledger.problems()
    counted = {d: sum(1 for r in replicas.values() if r["deployment"] == d) for d in ("Driver", "Thinker", "DiT")}
    summary = {"minutes": args.minutes, "clients": args.clients, "requests": ledger.sent, **problems,
               "failures": ledger.failed[:10], "bounds": {"rss_growth_mb": args.rss_growth_mb, "fd_growth": args.fd_growth},
               "replicas": replicas, "over_bounds": over, "replicas_seen": counted}
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    ok = not over and not any(problems.values()) and counted == {"Driver": 1, "Thinker": 1, "DiT": 2}
    print("soak: PASS" if ok else "soak: FAIL", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
