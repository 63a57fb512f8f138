"""`python -m bagel_ray.jobs.bulk`: generate for every item of a prompts file into a folder,
resumably; meant to run as a Ray job:

    ray job submit --working-dir . -- python -m bagel_ray.jobs.bulk \\
        --model /shared/BAGEL-7B-MoT --input prompts.jsonl --output /shared/out --dit-replicas 4

The input is a `.txt` (one prompt a line, all of `--modality`) or a `.jsonl` (one item a line:
`id`, `prompt`, optional `modality`, `image` and knobs named as the flags below (or their aliases);
see `bagel_ray.jobs.inputs`). Request flags given here are the defaults of every item. The
file is read as a stream, so memory stays flat for millions of lines.

Where the items run:
- standalone (the default): a Ray Data pipeline over pools of Thinker and DiT actors
  (`--thinker-replicas`, `--dit-replicas`, GPUs and CPUs per actor), loading `--model`;
- `--app NAME`: through the `generate` method of a bagel-ray Serve app already running on
  the cluster (`serve.get_app_handle(NAME)`).

The output folder gets `<id>.png` or `<id>.txt` per item (written atomically) and
`results.jsonl`, one record per item: `id`, `status` (ok / failed), `error`, `output` (file
name), `modality`, `seed`, `timings` (plus `think_text`, `finish_reason` where they apply). A
bad item (unknown field, wrong value, unreadable image) is recorded as failed and the job goes
on. Rerunning the same command resumes: items with a record are skipped (failed ones too,
unless `--retry-failed`), and a job killed at any moment loses at most the items in flight.
Progress goes to stdout every `--progress-interval` seconds (a bar on a terminal).

Exit status: 0 when every item has a record (failed items included: see the summary and
results.jsonl), 2 for bad flags or input (found before anything loads), 1 if the run broke
off (the cluster, an actor or the app failed; rerun to resume), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Sequence

from bagel_ray.engine.pipeline import DTYPES
from bagel_ray.engine.request import GenerationRequest
from bagel_ray.flags import UsageError, add_request_flags, read_image, request_fields
from bagel_ray.jobs.inputs import JobInput, scan
from bagel_ray.jobs.progress import Progress
from bagel_ray.jobs.store import RESULTS_FILE, ResultStore
from bagel_ray.model.loader import DEFAULT_MODEL
from bagel_ray.routes import IMAGE_INPUT, MODALITIES

JOBS_EXTRA = ("ray", "pyarrow", "pandas")  # what `pip install 'bagel-ray[jobs]'` (ray[data]) brings

# Standalone-only flags (dest -> flag) and their defaults (DataOptions' fields of the same names).
DATA_FLAGS = {
    "device": "--device", "dtype": "--dtype", "thinker_replicas": "--thinker-replicas", "dit_replicas": "--dit-replicas",
    "thinker_gpus": "--thinker-gpus", "dit_gpus": "--dit-gpus", "thinker_cpus": "--thinker-cpus", "dit_cpus": "--dit-cpus",
    "thinker_batch_size": "--thinker-batch-size", "dit_batch_size": "--dit-batch-size",
}
APP_FLAGS = {"max_in_flight": "--max-in-flight"}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _share(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from bagel_ray.jobs.data_runner import DataOptions

    defaults = DataOptions(model=DEFAULT_MODEL)
    p = argparse.ArgumentParser(
        prog="python -m bagel_ray.jobs.bulk",
        description="Generate for every item of a prompts file, resumably (run it with `ray job submit`).")
    p.add_argument("--input", type=Path, required=True, metavar="FILE",
                   help=".txt (one prompt a line) or .jsonl (one item a line: id, prompt, and optionally modality, image, "
                        "request fields named as the flags below)")
    p.add_argument("--output", type=Path, required=True, metavar="DIR",
                   help="output folder: <id>.png / <id>.txt and results.jsonl. Give an absolute path (or shared storage) "
                        "in a Ray job: a relative one lands in the job's temporary working directory")
    p.add_argument("--modality", choices=MODALITIES, default=MODALITIES[0],
                   help=f"of every .txt item, and of .jsonl items that name none (default: {MODALITIES[0]})")
    p.add_argument("--image-path", type=Path,
                   help=f"input image of {' and '.join(IMAGE_INPUT)} items that name none (a .txt input's only image)")
    p.add_argument("--images-anywhere", action="store_true",
                   help="let .jsonl items name images outside the input file's folder (absolute paths, ../, links "
                        "leading out); by default such items fail")
    p.add_argument("--model",
                   help=f"checkpoint folder, hub id, or 'tiny' for the embedded test model (default: {DEFAULT_MODEL}; "
                        "with --app, the app's model, which --model must match if given)")
    p.add_argument("--retry-failed", action="store_true",
                   help="run the items recorded as failed again (default: a rerun skips every item with a record)")
    p.add_argument("--progress-interval", type=float, default=10.0, metavar="S",
                   help="seconds between progress lines (default: 10)")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="Ray cluster to use (default: the job's cluster, RAY_ADDRESS, the one started on this machine, "
                        "else a new local one)")
    add_request_flags(p, "request defaults of every item (an item's own fields win; unset: the official defaults)")

    app = p.add_argument_group("through a running Serve app")
    app.add_argument("--app", metavar="NAME", help="name of a running bagel-ray Serve app (default: run standalone)")
    app.add_argument("--max-in-flight", type=_positive_int, metavar="N",
                     help="requests in flight (default: as many as both of the app's stages queue)")

    data = p.add_argument_group("standalone with Ray Data (without --app)")
    data.add_argument("--device", choices=("auto", "cuda", "cpu"),
                      help="engines' device (default: auto, cuda where the actor has a GPU)")
    data.add_argument("--dtype", choices=tuple(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    for stage, lower in (("Thinker", "thinker"), ("DiT", "dit")):
        data.add_argument(f"--{lower}-replicas", type=_positive_int, metavar="N",
                          help=f"{stage} actors (default: {getattr(defaults, f'{lower}_replicas')})")
        data.add_argument(f"--{lower}-gpus", type=_share, metavar="G",
                          help=f"GPUs per {stage} actor (default: 1 if the cluster has GPUs and --device is not cpu, else 0)")
        data.add_argument(f"--{lower}-cpus", type=_share, metavar="C",
                          help=f"CPUs per {stage} actor (default: {getattr(defaults, f'{lower}_cpus'):g})")
    data.add_argument("--thinker-batch-size", type=_positive_int, metavar="N",
                      help=f"items a Thinker actor takes at once; text answers decode together "
                           f"(default: {defaults.thinker_batch_size})")
    data.add_argument("--dit-batch-size", type=_positive_int, metavar="N",
                      help=f"items a DiT actor takes at once; images of one size denoise together, step by step "
                           f"(default: {defaults.dit_batch_size})")
    return p


# -- checks (before anything loads) -----------------------------------------------------------


def check_flags(args: argparse.Namespace) -> None:
    wrong = APP_FLAGS if args.app is None else DATA_FLAGS
    given = [flag for dest, flag in wrong.items() if getattr(args, dest) is not None]
    if given:
        raise UsageError(f"{', '.join(given)} only appl{'y' if len(given) > 1 else 'ies'} "
                         f"{'with --app' if args.app is None else 'without --app (standalone)'}")
    if args.progress_interval <= 0:
        raise UsageError(f"--progress-interval must be > 0, got {args.progress_interval}")


def job_input(args: argparse.Namespace) -> JobInput:
    """The job's input, checked: the file kind and, for a .txt (whose items share every
    setting), the request the flags describe."""
    if not args.input.is_file():
        raise UsageError(f"input {args.input} is not a file")
    image = None if args.image_path is None else str(args.image_path.resolve())
    job = JobInput(str(args.input.resolve()), args.modality, request_fields(vars(args)), image, args.images_anywhere)
    if job.kind == ".txt":
        if args.image_path is not None and args.modality not in IMAGE_INPUT:
            raise UsageError(f"--image-path does not apply to {args.modality} (it is for {', '.join(IMAGE_INPUT)})")
        try:
            GenerationRequest(args.modality, "probe", image=read_image(image), **job.defaults)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    elif image is not None:
        read_image(image)
    return job


def make_runner(args: argparse.Namespace):
    if args.app is not None:
        from bagel_ray.jobs.app_runner import AppRunner

        return AppRunner(args.app, args.ray_address, args.max_in_flight, args.model)
    from bagel_ray.jobs.data_runner import DataOptions, DataRunner

    given = {dest: getattr(args, dest) for dest in DATA_FLAGS if getattr(args, dest) is not None}
    return DataRunner(DataOptions(model=args.model or DEFAULT_MODEL, **given), args.ray_address)


# -- the run ----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    check_flags(args)
    job = job_input(args)
    output = args.output.resolve()
    store = ResultStore(output, retry_failed=args.retry_failed)
    runner = progress = None
    try:
        found = scan(job.path, job.modality, store.done)
        print(f"bulk: {found.total} items in {job.path}: {found.ok} ok and {found.failed} failed in earlier runs, "
              f"{found.todo} to run; results in {output / RESULTS_FILE}", flush=True)
        if store.truncated_bytes:
            print(f"bulk: dropped the incomplete last line of {RESULTS_FILE} ({store.truncated_bytes} bytes) "
                  "that a killed run left", flush=True)
        if store.retried:
            print(f"bulk: --retry-failed: {store.retried} failed records removed; those items run again", flush=True)
        progress = Progress(found.total, found.ok + found.failed, found.failed, args.progress_interval)
        if found.todo:
            runner = make_runner(args)
            progress.say(f"bulk: running {runner.describe()}")
            for outcome in runner.outcomes(job, found):
                store.commit(outcome)
                progress.update(outcome.ok)
        progress.close()
        print(progress.summary(), flush=True)
        return 0
    finally:
        if progress is not None:
            progress.close()
        try:
            if runner is not None:
                runner.close()
        finally:
            store.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bulk: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in JOBS_EXTRA:
            # the [jobs] extra is missing: one line, since rerunning would not help
            print(f"bulk: {exc.name} is not installed: pip install 'bagel-ray[jobs]'", file=sys.stderr)
            return 1
        traceback.print_exc()
        print(f"bulk: stopped: {type(exc).__name__}: {exc}; rerun the same command to resume", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
