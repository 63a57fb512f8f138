"""Time to ready of `serve run` with the full-size checkpoint on local disk (issue 6: <= 60 s).

    python3 -m benchmarks.time_to_ready --dir /tmp/bagel-7b-random [--json FILE]
    python3 -m benchmarks.time_to_ready --smoke     # the same steps on the CPU with the tiny model

1. Writes a random BAGEL-7B-MoT checkpoint in the official layout to --dir unless it holds one
   (`write_random_checkpoint`, streamed tensor by tensor), and prints the time, size and the
   peak host memory of the writer.
2. Evicts the checkpoint from the page cache: `sync; echo 3 > /proc/sys/vm/drop_caches` where
   that is allowed, else (and always with --smoke) `posix_fadvise(DONTNEED)` on each file, which
   needs no root, then measures how much of it is still resident (`mincore`), so the reader
   knows whether the read was cold.
3. Starts the real `serve run` CLI (`python -m ray.serve.scripts run`, the code of the `serve`
   console script, with this interpreter) on deployments/bagel_single_gpu.yaml with `model:`
   pointing at --dir and the HTTP server on loopback, in a fresh local Ray (`--address local`,
   `RAY_AUTH_MODE=disabled` as for the README's local clusters). Ready is when `GET /health`
   answers 200 *and* the app is RUNNING (every replica of the three deployments constructed:
   the state `serve status` reports, read from the dashboard's Serve API). Both are needed: the
   ingress answers /health as soon as its own replica is up, while the Thinker and DiT may
   still be loading.
4. One text2text request (8 tokens) and one 64x64 text2img request (2 steps) prove it serves.
5. Stops it (SIGINT: `serve run` shuts Serve and its Ray down), then times the pure load in this
   process, page cache evicted again: `load_checkpoint` of the Thinker's and then of the DiT's
   parts, as the config's stages load them (in Serve both load at once, from one page cache).

Prints the steps as they happen, then one table row; `--json FILE` writes every figure.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import ctypes.util
import gc
import io
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
GPU_CONFIG = REPO_ROOT / "deployments" / "bagel_single_gpu.yaml"
TINY_CONFIG_YAML = REPO_ROOT / "deployments" / "tiny.yaml"
TARGET_S = 60.0
POLL_S = 0.25
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_DASHBOARD = re.compile(r"View the dashboard at (https?://\S+)")
# Lines of `serve run`'s output whose first appearance is timed (a breakdown of the wait).
MARKERS = {"ray_started": "Started a local Ray instance", "config_submitted": "Submitted deploy config"}


# -- the checkpoint -----------------------------------------------------------------------------


def ensure_checkpoint(folder: Path, smoke: bool, seed: int) -> dict:
    """Write the random checkpoint unless `folder` holds one; its size and how it was made."""
    from bagel_ray.model.config import BagelConfig
    from bagel_ray.model.layout import EMA_FILE
    from bagel_ray.model.loader import read_config
    from bagel_ray.model.random_checkpoint import write_random_checkpoint
    from bagel_ray.model.tiny import TINY_CONFIG

    cfg = TINY_CONFIG if smoke else BagelConfig()
    info: dict = {"dir": str(folder), "size": "tiny" if smoke else "7b"}
    if (folder / EMA_FILE).exists():
        if read_config(folder) != cfg:
            raise SystemExit(f"{folder} holds a checkpoint of another size; remove it or pass another --dir")
        info["written"] = False
        print(f"checkpoint: reusing {folder}", flush=True)
    else:
        t0 = time.perf_counter()
        write_random_checkpoint(folder, cfg, seed)
        info.update(written=True, write_s=time.perf_counter() - t0,
                    writer_peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9)
    info["bytes"] = sum(p.stat().st_size for p in checkpoint_files(folder))
    if info["written"]:
        print(f"checkpoint: wrote {info['bytes'] / 1e9:.2f} GB to {folder} in {info['write_s']:.1f} s "
              f"({info['bytes'] / 1e9 / info['write_s']:.2f} GB/s; peak host memory of this process "
              f"{info['writer_peak_rss_gb']:.2f} GB)", flush=True)
    return info


def checkpoint_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


# -- the page cache -----------------------------------------------------------------------------


def evict(files: list[Path], drop_all: bool = True) -> str:
    """Drop `files` from the page cache (with `drop_all`, the whole page cache if allowed); returns how."""
    os.sync()
    refused = "not tried"
    if drop_all:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return "drop_caches"
        except OSError as exc:
            refused = f"refused: {exc.strerror or type(exc).__name__}"
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return f"posix_fadvise(DONTNEED) (drop_caches {refused})"


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def resident_fraction(files: list[Path]) -> float | None:
    """Share of the files' pages in the page cache (`mincore` over a read-only mapping, which
    reads nothing); None where the call is not available."""
    import mmap

    try:
        libc = _libc()
    except (OSError, AttributeError):
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    total = resident = 0
    for path in files:
        size = path.stat().st_size
        if size == 0:
            continue
        pages = (size + page - 1) // page
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                vec = (ctypes.c_ubyte * pages)()
                if libc.mincore(addr, size, vec) != 0:
                    return None
                resident += int((np.frombuffer(vec, dtype=np.uint8) & 1).sum())
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
        total += pages
    return resident / total if total else 0.0


def cold_start(files: list[Path], drop_all: bool) -> dict:
    how = evict(files, drop_all)
    frac = resident_fraction(files)
    shown = "unknown" if frac is None else f"{100 * frac:.1f} %"
    print(f"page cache: {how}; checkpoint resident afterwards: {shown}", flush=True)
    return {"evicted_by": how, "resident_fraction": frac}


# -- serve run ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_app_config(base: Path, model_dir: Path, port: int | None, out: Path) -> tuple[dict, int, str]:
    """`base` with `model:` set to the folder and HTTP on loopback; returns (app args, port, app name)."""
    config = yaml.safe_load(base.read_text())
    if len(config["applications"]) != 1:
        raise SystemExit(f"{base}: expected one application")
    app = config["applications"][0]
    app["args"]["model"] = str(model_dir)
    http = config.setdefault("http_options", {})
    http["host"] = "127.0.0.1"
    if port is not None:
        http["port"] = port
    http.setdefault("port", 8000)
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return app["args"], http["port"], app["name"]


class ServeRun:
    """`serve run CONFIG` in its own process group, its output in a log file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log_path = log
        # Ray's token auth off for this local cluster, as for the README's local clusters, so
        # the dashboard's Serve API answers the poll without a token; unbuffered, so the timed
        # lines reach the log when printed.
        env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
        self.cmd = [sys.executable, "-m", "ray.serve.scripts", "run", str(config), "--address", "local"]
        self._log = open(log, "wb")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def output(self) -> str:
        return _ANSI.sub("", self.log_path.read_text(errors="replace"))

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def stop(self, timeout: float = 90.0) -> float:
        """SIGINT (serve run shuts Serve and the Ray it started down), then whatever is left of
        its process group is terminated. Returns the seconds it took."""
        t0 = time.perf_counter()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"serve run did not exit {timeout:.0f} s after SIGINT; terminating its process group", flush=True)
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            if not self._group_alive():
                break
            os.killpg(self.proc.pid, sig)
            deadline = time.perf_counter() + wait
            while self._group_alive() and time.perf_counter() < deadline:
                time.sleep(0.2)
        if self.proc.poll() is None:
            self.proc.wait(5)
        self._log.close()
        return time.perf_counter() - t0

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True


def app_status(dashboard: str, app: str) -> tuple[str | None, str]:
    """The app's status and message from the dashboard's Serve API (what `serve status` shows)."""
    r = requests.get(dashboard + "/api/serve/applications/", timeout=2)
    r.raise_for_status()
    entry = r.json().get("applications", {}).get(app)
    return (None, "") if entry is None else (entry["status"], entry.get("message", ""))


def wait_ready(run: ServeRun, url: str, app: str, timeout: float) -> dict:
    """Poll until /health answers 200 and the app is RUNNING; seconds since launch of each."""
    times: dict[str, float] = {}
    dashboard = None
    seen = 0
    while True:
        now = time.perf_counter() - run.t0
        if run.proc.poll() is not None:
            raise RuntimeError(f"serve run exited with status {run.proc.returncode} before the app was ready:\n{run.tail()}")
        text = run.output()
        if len(text) > seen:
            for name, marker in MARKERS.items():
                if name not in times and marker in text:
                    times[name] = now
            seen = len(text)
        if dashboard is None and (m := _DASHBOARD.search(text)):
            dashboard = m.group(1).rstrip("/")
        if "health_200" not in times:
            try:
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    times["health_200"] = now
            except requests.RequestException:
                pass
        if "app_running" not in times and dashboard is not None:
            try:
                status, message = app_status(dashboard, app)
            except (requests.RequestException, ValueError):  # the dashboard is still starting
                status, message = None, ""
            if status == "RUNNING":
                times["app_running"] = now
            elif status == "DEPLOY_FAILED":
                raise RuntimeError(f"app {app!r} failed to deploy: {message}\n{run.tail()}")
        if "health_200" in times and "app_running" in times:
            times["ready"] = max(times["health_200"], times["app_running"])
            return times
        if now > timeout:
            where = "no dashboard address in serve run's output" if dashboard is None else f"dashboard {dashboard}"
            raise TimeoutError(f"not ready after {timeout:.0f} s ({times}; {where}):\n{run.tail()}")
        time.sleep(POLL_S)


def probe(url: str) -> dict:
    """One text2text and one text2img request through the app; seconds of each."""
    from PIL import Image

    t0 = time.perf_counter()
    r = requests.post(url + "/v1/chat/completions", timeout=600,
                      json={"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8})
    r.raise_for_status()
    text_s = time.perf_counter() - t0
    tokens = r.json()["usage"]["completion_tokens"]
    t0 = time.perf_counter()
    r = requests.post(url + "/v1/images/generations", timeout=600,
                      json={"prompt": "a red fox", "size": "64x64", "num_inference_steps": 2, "seed": 0})
    r.raise_for_status()
    image_s = time.perf_counter() - t0
    size = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).size
    if size != (64, 64):
        raise RuntimeError(f"text2img probe returned a {size} image, not 64x64")
    print(f"probe: text2text {tokens} tokens in {text_s:.2f} s, text2img 64x64 2 steps in {image_s:.2f} s", flush=True)
    return {"text2text_s": text_s, "text2text_tokens": tokens, "text2img_s": image_s}


# -- the pure load ------------------------------------------------------------------------------


def pure_load(folder: Path, app_args: dict, drop_all: bool) -> dict:
    """`load_checkpoint` of each stage's parts in this process, each from a cold page cache."""
    import torch

    from bagel_ray.model.layout import AE_FILE, stage_bytes
    from bagel_ray.model.loader import load_checkpoint, read_config
    from bagel_ray.serve.config import AppConfig
    from bagel_ray.serve.engines import dit_parts, resolve_device, thinker_parts

    app = AppConfig.model_validate(app_args)
    cfg = read_config(folder)
    out: dict = {}
    for stage, parts in (("thinker", thinker_parts(app)), ("dit", dit_parts(app))):
        files = checkpoint_files(folder)
        cache = cold_start(files, drop_all)
        device, dtype = resolve_device(getattr(app, stage))
        t0 = time.perf_counter()
        ckpt = load_checkpoint(folder, parts, device, dtype)
        if device == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        nbytes = stage_bytes(cfg, parts) + ((folder / AE_FILE).stat().st_size if "vae" in parts else 0)
        out[stage] = {"seconds": secs, "bytes": nbytes, "device": device, "dtype": str(dtype), "parts": sorted(parts),
                      "resident_fraction_before": cache["resident_fraction"]}
        print(f"pure load, {stage}: {nbytes / 1e9:.2f} GB in {secs:.1f} s ({nbytes / 1e9 / secs:.2f} GB/s) "
              f"to {device} {dtype}", flush=True)
        del ckpt
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


# -- main ---------------------------------------------------------------------------------------


def device_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001 - only for the report
        return "unknown"


def table(result: dict) -> str:
    ckpt, ready, probe_ = result["checkpoint"], result["ready"], result.get("probe") or {}
    load = result.get("pure_load") or {}
    resident = result["page_cache"]["resident_fraction"]

    def s(v: float | None) -> str:
        return "" if v is None else f"{v:.1f}"

    head = ("| checkpoint | GB | write s | cached at launch | /health 200 s | app RUNNING s | ready s | target | "
            "text2text 8 tok s | text2img 64² s | load thinker s | load dit s | device |")
    row = (f"| {ckpt['size']} random | {ckpt['bytes'] / 1e9:.2f} | {s(ckpt.get('write_s'))} | "
           f"{'?' if resident is None else f'{100 * resident:.1f} %'} | {s(ready['health_200'])} | "
           f"{s(ready['app_running'])} | **{ready['ready']:.1f}** | "
           f"{'met' if ready['ready'] <= TARGET_S else 'not met'} (<= {TARGET_S:.0f} s) | "
           f"{s(probe_.get('text2text_s'))} | {s(probe_.get('text2img_s'))} | "
           f"{s(load.get('thinker', {}).get('seconds'))} | {s(load.get('dit', {}).get('seconds'))} | {result['device']} |")
    return "\n".join((head, "|" + "---|" * (head.count("|") - 1), row))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=None,
                        help="checkpoint folder, written if it holds none (default: /tmp/bagel-7b-random; "
                             "with --smoke one in the run's temporary folder)")
    parser.add_argument("--config", type=Path, default=None,
                        help=f"Serve config whose model: is replaced (default: {GPU_CONFIG.relative_to(REPO_ROOT)}; "
                             f"with --smoke {TINY_CONFIG_YAML.relative_to(REPO_ROOT)})")
    parser.add_argument("--smoke", action="store_true", help="the tiny model on the CPU: every step, in seconds")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's; with --smoke a free one)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for ready (default: 900)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-probe", action="store_true", help="skip the two requests")
    parser.add_argument("--no-load", action="store_true", help="skip the in-process pure load")
    parser.add_argument("--json", type=Path, default=None, help="write every figure to this file")
    args = parser.parse_args(argv)
    # A kill (e.g. a time limit) still stops serve run and the Ray it started (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    work = Path(tempfile.mkdtemp(prefix="time-to-ready-"))  # the Serve config and serve run's log
    folder = args.dir or (work / "model" if args.smoke else Path("/tmp/bagel-7b-random"))
    base = args.config or (TINY_CONFIG_YAML if args.smoke else GPU_CONFIG)
    port = args.port or (free_port() if args.smoke else None)

    result: dict = {"device": device_name(), "config": str(base)}
    result["checkpoint"] = ensure_checkpoint(folder, args.smoke, args.seed)
    files = checkpoint_files(folder)
    app_args, port, app = write_app_config(base, folder, port, work / "app.yaml")
    url = f"http://127.0.0.1:{port}"
    drop_all = not args.smoke  # the tiny files need no machine-wide drop
    result["page_cache"] = cold_start(files, drop_all)

    run = ServeRun(work / "app.yaml", work / "serve_run.log")
    print(f"serve run: {' '.join(run.cmd)} (log {run.log_path})", flush=True)
    try:
        result["ready"] = wait_ready(run, url, app, args.timeout)
        print("ready: " + ", ".join(f"{k} {v:.1f} s" for k, v in result["ready"].items()), flush=True)
        result["resident_fraction_when_ready"] = resident_fraction(files)
        result["probe"] = None if args.no_probe else probe(url)
    finally:
        result["shutdown_s"] = run.stop()
        print(f"serve run stopped in {result['shutdown_s']:.1f} s", flush=True)
    result["serve_run_log"], result["serve_run_pid"] = str(run.log_path), run.proc.pid
    result["pure_load"] = None if args.no_load else pure_load(folder, app_args, drop_all)

    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
