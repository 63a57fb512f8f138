"""`bagel-ray`: the command line.

`generate` mirrors vllm-omni's BAGEL `end2end.py`. Each request flag is a knob of
`bagel_ray.knobs` (`--num-inference-steps`, or `--steps` as in end2end.py), maps onto the
`GenerationRequest` field of the same name and defaults to None, so the request model's
per-modality official defaults apply (the help text reads them from the knob). Everything that
can be checked without the weights (prompts, image, sizes) is checked before the model loads;
bad input ends with one `error: ...` line on stderr and exit code 2.

`--worker-backend` picks where requests run: `process` loads `LocalPipeline` here; `ray`
sends them through the handle of a Serve app (reused if running, else deployed from
`--stage-configs-path` and removed at the end), several in flight at once. Both write the
same results.jsonl and PNGs for the same flags.

    bagel-ray make-tiny-model DIR [--seed N]
    bagel-ray make-random-model DIR [--size 7b] [--seed N]
    bagel-ray generate --model tiny --modality text2img --prompts "a red fox" --steps 8
    bagel-ray generate --model tiny --worker-backend ray --prompts "a red fox" --steps 8
    bagel-ray serve deployments/tiny.yaml   # the HTTP server, on a Ray of its own, metrics on a fixed port
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from collections import deque
from contextlib import closing
from typing import Callable, Iterator, Protocol, Sequence

from tqdm import tqdm

from bagel_ray.atomic import save_png, temp_path
from bagel_ray.engine.dit import StepRecord
from bagel_ray.engine.pipeline import DTYPES, LocalPipeline
from bagel_ray.engine.request import GenerationRequest, GenerationResult
from bagel_ray.flags import UsageError, add_request_flags, default_dtype, fit_size, read_image, request_fields
from bagel_ray.model.layout import CheckpointError
from bagel_ray.model.loader import DEFAULT_MODEL, read_config, resolve_model_path
from bagel_ray.routes import IMAGE_INPUT, MODALITIES

RESULTS_FILE = "results.jsonl"
RANDOM_SIZES = ("tiny", "7b")  # make-random-model: the embedded tiny geometry, or BAGEL-7B-MoT's
# The Serve config `--worker-backend ray` uses for `--model tiny` when none is given.
TINY_APP_CONFIG = Path(__file__).resolve().parent.parent / "deployments" / "tiny.yaml"


class Runner(Protocol):
    """Where a job's requests run. Made from the flags (cheap checks, the model's limits),
    then `start`ed (weights load) once the requests are checked against `max_image_side`."""

    max_image_side: int

    def start(self) -> None: ...

    def results(self, requests: Sequence[GenerationRequest]) -> Iterator[GenerationResult]:
        """One result per request, in order; `timings["total_s"]` is its wall time."""
        ...

    def close(self) -> None: ...


class ProcessRunner:
    """Thinker and DiT in this process (`LocalPipeline`), one request at a time, with a bar
    over each image's denoising steps."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.device = resolve_device(args.device)
        self.dtype = args.dtype or default_dtype(self.device)
        self.folder = resolve_model_path(args.model or DEFAULT_MODEL)
        self.max_image_side = read_config(self.folder).max_image_side
        self.pipeline: LocalPipeline | None = None

    def start(self) -> None:
        self.pipeline = LocalPipeline.from_pretrained(self.folder, device=self.device, dtype=self.dtype)

    def results(self, requests: Sequence[GenerationRequest]) -> Iterator[GenerationResult]:
        for req in requests:
            start = time.perf_counter()
            if req.outputs_image:
                with StepBar() as on_step:
                    result = self.pipeline.run(req, on_step)
            else:
                result = self.pipeline.run(req)
            result.timings["total_s"] = time.perf_counter() - start
            yield result

    def close(self) -> None:
        self.pipeline = None


class RayRunner:
    """Requests through the handle of a bagel-ray Serve app, up to `max_in_flight` at once
    (so the Thinker batches text requests), collected in order. Denoising progress does not
    come through the handle, so there is no step bar."""

    def __init__(self, args: argparse.Namespace) -> None:
        from bagel_ray.serve.deploy import AppSession, AppSpec

        path = stage_configs_path(args)
        spec = AppSpec.from_file(path)
        settings = {key: getattr(args, flag) for key, flag in RAY_SETTINGS.items() if getattr(args, flag) is not None}
        try:
            spec = spec.with_settings(settings)
        except ValueError as exc:
            raise UsageError(f"--model/--dtype/--device do not fit the app config: {exc}") from exc
        self.session = AppSession.open(spec, args.ray_address, pinned=frozenset(settings))
        if self.session.drift:
            print(f"warning: using the running Serve app {spec.name!r}, which differs from {path} "
                  f"in {', '.join(self.session.drift)}", file=sys.stderr)
        try:
            self.max_image_side = self.session.handle.model_info.remote().result().max_image_side
        except BaseException:
            self.session.close()
            raise

    def start(self) -> None:
        pass

    def results(self, requests: Sequence[GenerationRequest]) -> Iterator[GenerationResult]:
        handle, todo = self.session.handle, iter(requests)
        in_flight: deque = deque()

        def submit() -> None:
            req = next(todo, None)
            if req is not None:
                in_flight.append((time.perf_counter(), handle.generate.remote(req)))

        try:
            for _ in range(self.session.max_in_flight):
                submit()
            while in_flight:
                start, response = in_flight[0]
                result = response.result()
                in_flight.popleft()
                result.timings["total_s"] = time.perf_counter() - start  # submission to collection
                submit()
                yield result
        finally:
            for _, response in in_flight:  # a failure or an interrupt: drop what is still queued
                response.cancel()

    def close(self) -> None:
        self.session.close()


# --worker-backend choices: name -> runner made from the parsed flags.
BACKENDS: dict[str, Callable[[argparse.Namespace], Runner]] = {"process": ProcessRunner, "ray": RayRunner}
# App config keys that --model/--dtype/--device set for the ray backend.
RAY_SETTINGS = {"model": "model", "thinker.dtype": "dtype", "dit.dtype": "dtype", "thinker.device": "device",
                "dit.device": "device"}
RAY_ONLY_FLAGS = {"ray_address": "--ray-address", "stage_configs_path": "--stage-configs-path"}


def stage_configs_path(args: argparse.Namespace) -> Path:
    if args.stage_configs_path is not None:
        return args.stage_configs_path
    if args.model != "tiny":
        raise UsageError("--worker-backend ray needs --stage-configs-path (a Serve config such as deployments/bagel.yaml) "
                         "unless --model tiny")
    if not TINY_APP_CONFIG.exists():
        raise UsageError(f"the default Serve config {TINY_APP_CONFIG} is missing; pass --stage-configs-path")
    return TINY_APP_CONFIG


# -- argument parsing -----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bagel-ray", description="Run BAGEL-7B-MoT (or the tiny test model) locally.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tiny = sub.add_parser("make-tiny-model", help="write the tiny random checkpoint into a folder")
    tiny.add_argument("dir", type=Path, metavar="DIR")
    tiny.add_argument("--seed", type=int, default=0, help="weights seed (default: 0, the embedded model's)")

    rand = sub.add_parser("make-random-model", help="write a random checkpoint of a given size in the official layout "
                                                    "(7b: the full-size BAGEL-7B-MoT files, 29.5 GB, streamed)")
    rand.add_argument("dir", type=Path, metavar="DIR")
    rand.add_argument("--size", choices=RANDOM_SIZES, default="7b", help="default: 7b")
    rand.add_argument("--seed", type=int, default=0, help="weights seed (default: 0)")

    srv = sub.add_parser("serve", help="serve the app of a Serve config file over HTTP until Ctrl-C, on a Ray of its "
                                       "own whose metrics export port is the config's metrics_export_port")
    srv.add_argument("config", type=Path, metavar="FILE", help="a Serve config file (deployments/*.yaml)")
    srv.add_argument("--address", metavar="ADDR",
                     help="deploy into the Ray cluster at ADDR (its nodes keep their metrics ports) instead of "
                          "starting a Ray of its own (the default, whatever RAY_ADDRESS says; it stops with the command)")

    gen = sub.add_parser("generate", help="generate images or text for prompts (like vllm-omni end2end.py)")
    gen.add_argument("--model",
                     help=f"checkpoint folder, hub id, or 'tiny' for the embedded test model (default: {DEFAULT_MODEL}; "
                          "with --worker-backend ray, the Serve config's args.model)")
    gen.add_argument("--modality", choices=MODALITIES, default=MODALITIES[0], help=f"default: {MODALITIES[0]}")
    prompts = gen.add_mutually_exclusive_group()
    prompts.add_argument("--prompts", nargs="+", metavar="PROMPT", help="one or more prompts")
    prompts.add_argument("--txt-prompts", type=Path, metavar="FILE", help="a text file with one prompt a line (blank lines skipped)")
    gen.add_argument("--image-path", type=Path, help=f"input image ({', '.join(IMAGE_INPUT)})")

    add_request_flags(gen, "request (unset flags take the request model's official defaults)")

    run = gen.add_argument_group("runtime")
    run.add_argument("--dtype", choices=tuple(DTYPES),
                     help="default: bfloat16 on cuda, float32 on cpu (ray: both stages' dtype in the Serve config)")
    run.add_argument("--device", help="default: cuda if available, else cpu (ray: auto, cuda or cpu; default: the Serve config's)")
    run.add_argument("--worker-backend", choices=tuple(BACKENDS), default="process",
                     help="process: LocalPipeline in this process; ray: the Serve app of --stage-configs-path (default: process)")
    run.add_argument("--output", type=Path, default=Path("outputs"), help="output folder (default: outputs)")
    run.add_argument("--enable-stats", action="store_true",
                     help="print per-stage timings (ray: with the KV handoff's bytes and seconds) and record them in results.jsonl")

    ray = gen.add_argument_group("ray backend (--worker-backend ray)")
    ray.add_argument("--ray-address", metavar="ADDR",
                     help="if Ray is already initialized in this process, that connection is used; otherwise "
                          "ray.init(address=ADDR): host:port or ray://host:port of a cluster, 'auto' for the one started "
                          "on this machine (error if none), 'local' for a new local one. Default: RAY_ADDRESS or the "
                          "cluster started on this machine, else a new local cluster. Ray is shut down at the end only "
                          "if this command initialized it (a cluster it started stops; one it joined keeps running)")
    ray.add_argument("--stage-configs-path", type=Path, metavar="FILE",
                     help="Serve config of the app (like deployments/*.yaml: one application of "
                          "bagel_ray.serve.app:build_app). If an app of its name is RUNNING it is used as is, and "
                          "--model/--dtype/--device, when given, must match it (else exit 2); otherwise the app is "
                          "deployed from FILE with those flags overriding args.model and both stages' dtype/device, and "
                          "deleted at the end. Default: deployments/tiny.yaml with --model tiny; required otherwise")
    return parser


# -- validation (before any weights load) ---------------------------------------------------


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.txt_prompts is not None:
        try:
            lines = args.txt_prompts.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read prompts file {args.txt_prompts}: {exc}") from exc
        prompts = [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise UsageError(f"prompts file {args.txt_prompts} has no prompts")
        return prompts
    if not args.prompts:
        raise UsageError("no prompts: pass --prompts or --txt-prompts")
    return list(args.prompts)


def resolve_device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError as exc:
        raise UsageError(f"bad --device {device!r}: {exc}") from exc
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available")
    return device


def build_requests(args: argparse.Namespace) -> list[GenerationRequest]:
    prompts = read_prompts(args)
    image = read_image(args.image_path)
    given = request_fields(vars(args))
    return [GenerationRequest(args.modality, prompt, image=image, **given) for prompt in prompts]


# -- output ---------------------------------------------------------------------------------


def record(index: int, result: GenerationResult, folder: Path, stats: bool) -> dict:
    image_name = None
    if result.image is not None:
        image_name = f"{index:05d}.png"
        save_png(result.image, folder / image_name)
    return {
        "prompt": result.prompt,
        "modality": result.modality,
        "text": result.text,
        "token_ids": result.token_ids,
        "think_text": result.think_text,
        "think_token_ids": result.think_token_ids,
        "image": image_name,
        "seed": result.seed,
        "timings": dict(result.timings) if stats else None,
    }


def format_timings(index: int, timings: dict[str, float]) -> str:
    counts = lambda k: k == "tokens" or k.endswith("_bytes")  # noqa: E731
    parts = " ".join(f"{k}={v:.0f}" if counts(k) else f"{k}={v:.3f}" for k, v in timings.items())
    return f"[{index:05d}] {parts}"


def on_terminal() -> bool:
    """Whether stderr redraws bars: in a pipe or a log file tqdm's carriage returns pile up
    into one unreadable line, so progress is written as lines there instead."""
    return sys.stderr.isatty()


class StepBar:
    """The nested bar over denoising steps, fed by `on_step` and sized by the first record;
    off a terminal, one line per image when it ends."""

    def __enter__(self) -> "StepBar":
        self.bar = tqdm(desc="denoise", unit="step", file=sys.stderr, leave=False) if on_terminal() else None
        self.steps, self.total = 0, None
        return self

    def __call__(self, rec: StepRecord) -> None:
        self.steps, self.total = self.steps + 1, rec.total
        if self.bar is not None:
            if self.bar.total is None:
                self.bar.total = rec.total
            self.bar.update(1)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.steps:
            print(f"denoise: {self.steps}/{self.total} steps", file=sys.stderr, flush=True)


# -- commands -------------------------------------------------------------------------------


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from bagel_ray.model.tiny import make_tiny_model

    try:
        folder = make_tiny_model(args.dir, seed=args.seed)
    except OSError as exc:
        raise UsageError(f"cannot write the tiny model to {args.dir}: {exc}") from exc
    print(f"wrote the tiny model (seed {args.seed}) to {folder}")
    return 0


def cmd_make_random_model(args: argparse.Namespace) -> int:
    from bagel_ray.model.config import BagelConfig
    from bagel_ray.model.random_checkpoint import write_random_checkpoint
    from bagel_ray.model.tiny import TINY_CONFIG

    cfg = {"tiny": TINY_CONFIG, "7b": BagelConfig()}[args.size]
    t0 = time.perf_counter()
    try:
        folder = write_random_checkpoint(args.dir, cfg, seed=args.seed)
    except OSError as exc:
        raise UsageError(f"cannot write the random model to {args.dir}: {exc}") from exc
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    print(f"wrote the {args.size} random model (seed {args.seed}, {size / 1e9:.2f} GB) to {folder} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if args.worker_backend != "ray":
        given = [flag for dest, flag in RAY_ONLY_FLAGS.items() if getattr(args, dest) is not None]
        if given:
            raise UsageError(f"{', '.join(given)} only apply to --worker-backend ray")
    try:
        requests = build_requests(args)
        runner = BACKENDS[args.worker_backend](args)
    except (CheckpointError, ValueError, OSError) as exc:
        raise UsageError(str(exc)) from exc
    try:
        try:
            requests = [fit_size(req, runner.max_image_side) for req in requests]
            args.output.mkdir(parents=True, exist_ok=True)
            runner.start()
        except (CheckpointError, ValueError, OSError) as exc:
            raise UsageError(str(exc)) from exc
        done = write_results(args, runner, requests)
    finally:
        runner.close()
    print(f"wrote {done} results to {args.output / RESULTS_FILE}")
    return 0


def write_results(args: argparse.Namespace, runner: Runner, requests: list[GenerationRequest]) -> int:
    """Run the requests, writing results.jsonl and the PNGs; returns how many completed."""
    out = args.output
    final = out / RESULTS_FILE
    tmp = temp_path(final)
    done = 0
    try:
        with tmp.open("w", encoding="utf-8") as results, closing(runner.results(requests)) as produced:
            bar = on_terminal()
            shown = tqdm(produced, total=len(requests), desc="prompts", unit="prompt", file=sys.stderr) if bar else produced
            for i, result in enumerate(shown):
                if not bar:
                    print(f"prompts: {i + 1}/{len(requests)}", file=sys.stderr, flush=True)
                if args.enable_stats:
                    tqdm.write(format_timings(i, result.timings))
                results.write(json.dumps(record(i, result, out, args.enable_stats), ensure_ascii=False) + "\n")
                results.flush()
                done += 1
    finally:
        # Completed results survive a failure part-way; results.jsonl is replaced in one step.
        if done:
            os.replace(tmp, final)
        tmp.unlink(missing_ok=True)
    return done


def cmd_serve(args: argparse.Namespace) -> int:
    """The quick start's server: `serve run --address local FILE` with the metrics port fixed."""
    from bagel_ray.serve.deploy import AppSpec, DeployError, ServedApp

    try:
        spec = AppSpec.from_file(args.config)
    except DeployError as exc:
        raise UsageError(str(exc)) from exc
    try:
        app = ServedApp.start(spec, args.address)
    except ConnectionError as exc:
        raise UsageError(str(exc)) from exc
    try:
        print(f"bagel-ray: app {spec.name!r} serving at {app.url}; {app.metrics}; Ctrl-C stops it", flush=True)
        while True:
            time.sleep(3600)
    finally:
        app.stop()


COMMANDS = {"make-tiny-model": cmd_make_tiny_model, "make-random-model": cmd_make_random_model, "generate": cmd_generate,
            "serve": cmd_serve}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback (results completed so far were written)
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
