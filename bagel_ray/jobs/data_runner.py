"""Bulk items standalone, with Ray Data and no Serve app: a streaming pipeline over pools of
Thinker and DiT actors.

    byte ranges of the input (driver)
      -> read and parse each range into requests (fused by Ray Data into the first actors)
      -> Thinker actors: text answers (batched decode), text2img contexts and think text
      -> DiT actors: denoise (the images of a batch stepped together) and VAE-decode
         (text2img over the Thinker's contexts; img2img whole, its contexts built on the DiT
         as with `edit_contexts_on: dit`), PNG-encode
      -> driver: writes each output and its record

Ray Data streams the blocks with backpressure, so only the items in flight are in memory,
whatever the size of the input. The input file (and its images) are read by Ray workers:
they must be at the same path on every node (inside the `--working-dir` of `ray job submit`,
which Ray copies to each node, or on shared storage). Outputs come back to the driver, so the
output folder needs to exist only where the driver runs.

Rows carry plain columns only: `id`, `modality`, `request` (the pickled GenerationRequest),
`handoff` (the pickled `Handoff`: KV contexts packed into one buffer by the object-store
transport, the initial noise, the think text), and once the item is finished `record` (its
JSON record) and `data` (its output file's bytes). Each stage works on the rows that are its
to do and passes the others through; an exception while running one item becomes that item's
failed record.
"""

from __future__ import annotations

import logging
import pickle
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from bagel_ray.engine.request import GenerationRequest
from bagel_ray.flags import default_dtype, fit_size
from bagel_ray.jobs.inputs import Chunk, ItemError, JobInput, Scan, build_request, failed_outcome, read_chunk
from bagel_ray.jobs.store import Outcome
from bagel_ray.routes import DIT, IMAGE_OUTPUT, TEXT_OUTPUT, THINKER, stage_parts, visits

if TYPE_CHECKING:
    from bagel_ray.engine.dit import DenoiseJob
    from bagel_ray.engine.pipeline import PreparedImage

log = logging.getLogger(__name__)

# The standalone job builds edit contexts on the DiT actors (no KV handoff for img2img).
EDIT_CONTEXTS_ON = DIT
THINKER_WORK = visits(THINKER, EDIT_CONTEXTS_ON)
DIT_WORK = visits(DIT, EDIT_CONTEXTS_ON)
COLUMNS = ("id", "modality", "request", "handoff", "record", "data")
ONE_ROW = 1  # target_max_block_size in bytes: any row exceeds it, so blocks hold one row
MAX_INPUT_BLOCKS = 1000  # blocks of chunk descriptors; a reader task takes one block


@dataclass(frozen=True)
class DataOptions:
    """The actor pools (`--thinker-*`, `--dit-*`) and the engines' model, device and dtype."""

    model: str
    device: str = "auto"  # auto: cuda where the actor has a GPU, else cpu
    dtype: str | None = None  # default: bfloat16 on cuda, float32 on cpu
    thinker_replicas: int = 1
    dit_replicas: int = 1
    thinker_gpus: float | None = None  # default: 1 if the cluster has GPUs and device is not cpu
    dit_gpus: float | None = None
    thinker_cpus: float = 1.0
    dit_cpus: float = 1.0
    thinker_batch_size: int = 8  # text requests decoded together
    dit_batch_size: int = 8  # images denoised together

    def gpus(self, given: float | None, cluster_gpus: float) -> float:
        if given is not None:
            return given
        return 1.0 if cluster_gpus > 0 and self.device != "cpu" else 0.0


@dataclass(frozen=True)
class Pool:
    replicas: int
    gpus: float
    cpus: float


@dataclass(frozen=True)
class EngineSpec:
    model: str
    device: str
    dtype: str | None

    def load(self, parts: frozenset[str]):
        import torch

        from bagel_ray.engine.pipeline import DTYPES
        from bagel_ray.model.loader import load_checkpoint

        device = self.device if self.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        return load_checkpoint(self.model, parts, device=device, dtype=DTYPES[self.dtype or default_dtype(device)])


@dataclass
class Row:
    id: str
    modality: str
    request: bytes = b""
    handoff: bytes = b""
    record: str = ""
    data: bytes = b""

    @property
    def pending(self) -> bool:
        return not self.record

    def finish(self, outcome: Outcome) -> None:
        as_row = outcome.to_row()
        self.record, self.data = as_row["record"], as_row["data"]
        self.request = self.handoff = b""

    def fail(self, exc: BaseException, req: GenerationRequest | None = None) -> None:
        seed = None if req is None else req.seed
        self.finish(Outcome.failed(self.id, f"{type(exc).__name__}: {exc}", self.modality, seed))


def _schema():
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("modality", pa.string()), ("request", pa.large_binary()),
                      ("handoff", pa.large_binary()), ("record", pa.large_string()), ("data", pa.large_binary())])


def rows_of(table) -> list[Row]:
    columns = {name: table.column(name).to_pylist() for name in COLUMNS}
    return [Row(*(columns[name][i] for name in COLUMNS)) for i in range(table.num_rows)]


def table_of(rows: list[Row]):
    import pyarrow as pa

    return pa.table({name: [getattr(r, name) for r in rows] for name in COLUMNS}, schema=_schema())


# -- stages -----------------------------------------------------------------------------------


def read_items(chunks, job: JobInput):
    """Reader tasks: a batch of chunk rows -> one row per item, a request or a failed record."""
    rows = []
    for chunk in chunks.to_pylist():
        for item in read_chunk(job, Chunk(**chunk)):
            try:
                req = build_request(item, job)
            except ItemError as exc:
                outcome = failed_outcome(item, job, str(exc))
                row = Row(item.id, outcome.record["modality"] or "")
                row.finish(outcome)
            else:
                row = Row(item.id, req.modality, request=pickle.dumps(req))
            rows.append(row)
    return table_of(rows)


class ThinkerStage:
    """One Thinker engine: text answers, decoded in batches, and text2img contexts."""

    def __init__(self, engine: EngineSpec) -> None:
        from bagel_ray.engine.pipeline import LocalPipeline
        from bagel_ray.engine.thinker import Thinker
        from bagel_ray.transport.base import make_transport

        ckpt = engine.load(stage_parts(THINKER, EDIT_CONTEXTS_ON))
        self.pipeline = LocalPipeline(Thinker(ckpt.model, ckpt.tokenizer, ckpt.vae), None)
        self.transport = make_transport("object_store")

    def __call__(self, table):
        rows = rows_of(table)
        todo = [r for r in rows if r.pending and r.modality in THINKER_WORK]
        self._understand([r for r in todo if r.modality in TEXT_OUTPUT])
        for row in todo:
            if row.modality in IMAGE_OUTPUT:  # its context, handed on to the DiT
                self._prepare(row)
        return table_of(rows)

    def _understand(self, rows: list[Row]) -> None:
        reqs = [pickle.loads(r.request) for r in rows]
        try:
            results: list[Any] = self.pipeline.understand_batch(reqs)
        except Exception as exc:  # one bad request must not fail the others: run them one by one
            log.warning("batched decode of %d requests failed (%s: %s); decoding them one by one",
                        len(reqs), type(exc).__name__, exc)
            results = []
            for req in reqs:
                try:
                    results.append(self.pipeline.understand(req))
                except Exception as exc:
                    results.append(exc)
        for row, req, result in zip(rows, reqs, results):
            if isinstance(result, Exception):
                row.fail(result, req)
            else:
                row.finish(Outcome.of_result(row.id, result))

    def _prepare(self, row: Row) -> None:
        from bagel_ray.serve.stages import Handoff

        req = pickle.loads(row.request)
        try:
            req = fit_size(req, self.pipeline.cfg.max_image_side)
            prepared = self.pipeline.prepare_image(req, noise=False)  # the DiT stage makes the noise
            payload = self.transport.send(prepared.contexts)
        except Exception as exc:
            row.fail(exc, req)
            return
        row.request = pickle.dumps(req)
        row.handoff = pickle.dumps(Handoff(payload, prepared.think_text, prepared.think_token_ids, prepared.timings))


class DiTStage:
    """One DiT engine (with the Thinker side, for img2img contexts): images, PNG-encoded."""

    def __init__(self, engine: EngineSpec) -> None:
        from bagel_ray.engine.dit import DiT
        from bagel_ray.engine.pipeline import LocalPipeline
        from bagel_ray.engine.thinker import Thinker
        from bagel_ray.transport.base import make_transport

        ckpt = engine.load(stage_parts(DIT, EDIT_CONTEXTS_ON))
        self.pipeline = LocalPipeline(Thinker(ckpt.model, ckpt.tokenizer, ckpt.vae), DiT(ckpt.model, ckpt.tokenizer, ckpt.vae))
        self.device = ckpt.model.device
        self.transport = make_transport("object_store")

    def __call__(self, table):
        """The batch's pending image rows, denoised together: one DiT forward over one image's
        rows leaves the GPU's GEMMs half empty, so their jobs are stepped as one batch
        (`BatchDenoiser`, as the Serve DiT batches requests; Ray Data hands this stage
        `--dit-batch-size` rows at a time). Each row fails alone: in its preparation, its job's
        checks, its denoising (a step that raises is retried with half the batch, down to the
        one job that fails) or its VAE decode."""
        rows = rows_of(table)
        jobs = []
        for row in rows:
            if row.pending and row.modality in DIT_WORK:
                req = pickle.loads(row.request)
                try:
                    prepared = self._prepared(req, row.handoff)
                    jobs.append(self.pipeline.dit.job(prepared.contexts, req.sampler(), prepared.noise,
                                                      key=(row, req, prepared)))
                except Exception as exc:
                    row.fail(exc, req)
        self._denoise(jobs)
        return table_of(rows)

    def _prepared(self, req: GenerationRequest, handoff: bytes) -> PreparedImage:
        """The contexts and noise of one image: received from the Thinker (text2img), or built
        here (img2img: an empty handoff)."""
        from bagel_ray.engine.pipeline import PreparedImage

        if not handoff:
            return self.pipeline.prepare_image(req)
        sent = pickle.loads(handoff)
        contexts, stats = self.transport.receive(sent.payload, self.device)
        timings = dict(sent.timings, handoff_bytes=float(stats.nbytes), handoff_send_s=stats.send_s,
                       handoff_receive_s=stats.receive_s)
        noise = self.pipeline.initial_noise(req, contexts)
        return PreparedImage(contexts, noise, sent.think_text, sent.think_token_ids, timings)

    def _denoise(self, jobs: list[DenoiseJob]) -> None:
        """Step the jobs (keyed by their row, request and prepared image) until each has ended,
        and finish each row as its job ends. A job's `denoise_s` runs from the batch's start
        to its end, as `LocalPipeline.render` times an image denoised alone."""
        from bagel_ray.engine.dit_batch import BatchDenoiser

        if not jobs:
            return
        batch = BatchDenoiser(self.pipeline.dit, len(jobs))
        t0 = time.perf_counter()
        for job in jobs:
            batch.submit(job)
        while not batch.idle:
            for job in batch.step_or_back_off():
                row, req, prepared = job.key
                if job.error is not None:
                    row.fail(job.error, req)
                    continue
                try:
                    result = self.pipeline.finish_image(req, prepared, job.x, {"denoise_s": time.perf_counter() - t0})
                except Exception as exc:  # this image's VAE decode: it alone
                    row.fail(exc, req)
                else:
                    row.finish(Outcome.of_result(row.id, result))


# -- the pipeline -----------------------------------------------------------------------------


def for_workers(job: JobInput) -> JobInput:
    """The job's paths as Ray workers see them. In a job with a `working_dir` (which Ray unpacks
    on every node and starts the workers in), paths inside it become relative to it; others
    stay absolute."""
    import ray

    if not ray.get_runtime_context().runtime_env.get("working_dir"):
        return job
    cwd = Path.cwd().resolve()

    def seen(path: str | None) -> str | None:
        return path if path is None or not Path(path).is_relative_to(cwd) else str(Path(path).relative_to(cwd))

    return replace(job, path=seen(job.path), image=seen(job.image))


@dataclass
class DataRunner:
    options: DataOptions
    address: str | None = None
    started_ray: bool = field(init=False, default=False)
    cluster_gpus: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        import ray

        from bagel_ray.flags import UsageError
        from bagel_ray.serve.deploy import connect

        self.started_ray = connect(self.address)
        self.cluster_gpus = ray.cluster_resources().get("GPU", 0.0)
        if self.options.device == "cuda" and not self.cluster_gpus:
            self.close()
            raise UsageError("--device cuda, but the Ray cluster has no GPUs")

    def pools(self) -> dict[str, Pool]:
        o, gpus = self.options, self.cluster_gpus
        return {"Thinker": Pool(o.thinker_replicas, o.gpus(o.thinker_gpus, gpus), o.thinker_cpus),
                "DiT": Pool(o.dit_replicas, o.gpus(o.dit_gpus, gpus), o.dit_cpus)}

    def describe(self) -> str:
        pools = ", ".join(f"{p.replicas} {name} actor(s) ({p.gpus:g} GPU, {p.cpus:g} CPU each)"
                          for name, p in self.pools().items())
        return f"standalone with Ray Data: {pools}, model {self.options.model}"

    def outcomes(self, job: JobInput, scan: Scan) -> Iterator[Outcome]:
        import ray.data

        o, pools = self.options, self.pools()
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the job prints its own progress
        # Every output row its own block: a stage hands each item on (and the driver records it)
        # as soon as it is finished, not when its whole input block is.
        context.target_max_block_size = ONE_ROW
        engine = EngineSpec(o.model, o.device, o.dtype)
        ds = ray.data.from_items([asdict(c) for c in scan.chunks], override_num_blocks=min(len(scan.chunks), MAX_INPUT_BLOCKS))
        stages = []
        if any(m in THINKER_WORK for m in scan.modalities):
            stages.append(("Thinker", ThinkerStage, o.thinker_batch_size))
        if any(m in DIT_WORK for m in scan.modalities):
            stages.append(("DiT", DiTStage, o.dit_batch_size))
        # Readers ask for the first stage's CPU share, so that Ray Data fuses them into its actors.
        first = pools[stages[0][0]] if stages else Pool(1, 0.0, 1.0)
        ds = ds.map_batches(read_items, batch_size=1, batch_format="pyarrow", fn_kwargs={"job": for_workers(job)},
                            num_cpus=first.cpus)
        for name, stage, batch_size in stages:
            pool = pools[name]
            ds = ds.map_batches(stage, batch_size=batch_size, batch_format="pyarrow", fn_constructor_kwargs={"engine": engine},
                                compute=ray.data.ActorPoolStrategy(size=pool.replicas), num_cpus=pool.cpus, num_gpus=pool.gpus)
        for row in ds.iter_rows():
            if not row["record"]:
                raise RuntimeError(f"item {row['id']} ({row['modality']}) left the pipeline unfinished")
            yield Outcome.from_row(row)

    def close(self) -> None:
        if self.started_ray:
            import ray

            ray.shutdown()
            self.started_ray = False
