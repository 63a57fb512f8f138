"""The input of a bulk job: a prompts file read as a stream, never held whole in memory.

- `.txt`: one prompt a line (blank lines skipped), all of the job's `--modality`; an item's
  id is its line number, zero-padded (`00000042`), so it stays the same across reruns.
- `.jsonl`: one JSON object a line with `id` (letters, digits, `.`, `_`, `-`; at most 128),
  `prompt`, optional `modality` (default: the job's `--modality`), optional `image` (a path
  relative to the input file's folder) and optional knobs (`bagel_ray.knobs`: `num_inference_steps`
  or its alias `steps`, `seed`, `height`, `width`, `max_tokens`, `think`, `cfg_text_scale`, ...),
  which override the job's flags for that item. Their types and ranges are the HTTP API's.

`scan` reads the file once before anything runs: it counts the items, checks that every line
is a JSON object with a valid, unique id (else the job stops before loading anything, naming
the line), and cuts the lines still to do into byte ranges (`Chunk`s). `read_chunk` reads
one range back, wherever it runs. Problems of one item (an unknown field, a value of the wrong
type or out of range, an unreadable image) surface in `build_request` and fail that item only.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from bagel_ray.engine.request import GenerationRequest
from bagel_ray.flags import UsageError, read_image, request_fields
from bagel_ray.jobs.store import Outcome
from bagel_ray.knobs import BY_NAME, DEFAULT_SEED, KNOBS, by_name
from bagel_ray.routes import IMAGE_INPUT

KINDS = (".txt", ".jsonl")
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ITEM_KEYS = frozenset({"id", "modality", "prompt", "image", *by_name(KNOBS)})  # knobs by name and alias
CHUNK_ITEMS = 16  # items a chunk holds at most: the unit one reader task parses


class ItemError(ValueError):
    """One item cannot run; it is recorded as failed with this message."""


@dataclass(frozen=True)
class Chunk:
    """A byte range of the input holding consecutive items still to do (and maybe blank
    lines), starting at line `first_line` (1-based)."""

    offset: int
    length: int
    first_line: int


@dataclass(frozen=True)
class Item:
    """One line of the input, as read: `fields` is the JSON object, or {"prompt": line}."""

    id: str
    line: int
    fields: dict[str, Any]


@dataclass
class Scan:
    total: int = 0  # items in the input
    ok: int = 0  # already recorded ok, skipped
    failed: int = 0  # already recorded failed, skipped
    chunks: list[Chunk] = field(default_factory=list)
    modalities: Counter = field(default_factory=Counter)  # of the items to do

    @property
    def todo(self) -> int:
        return sum(self.modalities.values())


@dataclass(frozen=True)
class JobInput:
    """What every reader needs to turn a line into a request; picklable, shipped to workers.
    Paths are as the readers see them: relative to the job's working directory when inside
    it (the same on every node of a `ray job submit --working-dir` job), else absolute."""

    path: str
    modality: str  # of .txt items, and of .jsonl items without one
    defaults: dict[str, Any]  # request fields set on the command line
    image: str | None = None  # --image-path: the input image of image-input items without one
    images_anywhere: bool = False  # --images-anywhere: item images may lie outside the input folder

    @property
    def kind(self) -> str:
        return Path(self.path).suffix

    def image_path(self, given: str) -> str:
        """A .jsonl `image`, relative to the input file's folder, and (unless `images_anywhere`)
        inside it once symlinks are followed: an input file must not make the job open any
        file its runner can read (an absolute path, `../`, or a link leading out)."""
        folder = Path(self.path).parent
        path = folder / given
        if not self.images_anywhere and not path.resolve().is_relative_to(folder.resolve()):
            raise ItemError(f"image {given!r} leads outside the input file's folder; "
                            f"--images-anywhere allows images anywhere")
        return str(path)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UsageError(f"input {self.path} must be a .txt (one prompt a line) or a .jsonl file")


def _item(kind: str, text: str, line: int) -> Item:
    """The item of one non-blank line; UsageError if the line has no usable id."""
    if kind == ".txt":
        return Item(f"{line:08d}", line, {"prompt": text.strip()})
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"line {line} is not valid JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise UsageError(f"line {line} is not a JSON object")
    item_id = fields.get("id")
    if isinstance(item_id, int) and not isinstance(item_id, bool):
        item_id = str(item_id)
    if not isinstance(item_id, str) or not ID_PATTERN.fullmatch(item_id):
        raise UsageError(f"line {line}: id must be 1-128 letters, digits, '.', '_' or '-' (not starting with one "
                         f"of the last three), got {fields.get('id')!r}")
    return Item(item_id, line, fields)


def _lines(data: Iterator[bytes], first_line: int, where: str) -> Iterator[tuple[int, int, str]]:
    """(line number, length in bytes, text) of each line."""
    for line, raw in enumerate(data, first_line):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"{where} line {line} is not UTF-8: {exc}") from None
        yield line, len(raw), text


def scan(path: str | Path, modality: str, done: Mapping[str, bool]) -> Scan:
    """Count the items, check ids, and chunk the items not in `done` (id -> recorded ok)."""
    path = Path(path)
    result, seen = Scan(), set()
    offset = start = first_line = items = 0

    def close(end: int) -> None:
        nonlocal items
        if items:
            result.chunks.append(Chunk(start, end - start, first_line))
        items = 0

    try:
        with open(path, "rb") as f:
            for line, size, text in _lines(f, 1, str(path)):
                if text.strip():
                    try:
                        item = _item(path.suffix, text, line)
                    except UsageError as exc:
                        raise UsageError(f"{path}: {exc}") from None
                    if item.id in seen:
                        raise UsageError(f"{path}: line {line}: duplicate id {item.id!r}")
                    seen.add(item.id)
                    result.total += 1
                    if item.id in done:
                        close(offset)
                        result.ok += done[item.id]
                        result.failed += not done[item.id]
                    else:
                        if not items:
                            start, first_line = offset, line
                        items += 1
                        wanted = item.fields.get("modality", modality)
                        result.modalities[wanted if isinstance(wanted, str) else repr(wanted)] += 1
                offset += size
                if items == CHUNK_ITEMS:
                    close(offset)
            close(offset)
    except OSError as exc:
        raise UsageError(f"cannot read input {path}: {exc}") from exc
    if not result.total:
        raise UsageError(f"input {path} has no items")
    return result


def read_chunk(job: JobInput, chunk: Chunk) -> Iterator[Item]:
    """The items of one chunk (the input must not have changed since `scan`)."""
    with open(job.path, "rb") as f:
        f.seek(chunk.offset)
        data = f.read(chunk.length)
    for line, _, text in _lines(io.BytesIO(data), chunk.first_line, job.path):  # split as `scan` does
        if text.strip():
            yield _item(job.kind, text, line)


# -- one item -> one request ------------------------------------------------------------------

def build_request(item: Item, job: JobInput) -> GenerationRequest:
    """The item's request: the job's flags, overridden by the item's own fields. Reads the
    input image. Raises ItemError naming the problem."""
    fields = item.fields
    unknown = sorted(set(fields) - ITEM_KEYS)
    if unknown:
        raise ItemError(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                        f"(known: {', '.join(sorted(ITEM_KEYS))})")
    modality, prompt, image_path = fields.get("modality", job.modality), fields.get("prompt"), fields.get("image")
    if not isinstance(modality, str):
        raise ItemError(f"modality must be a string, got {json.dumps(modality)}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ItemError("prompt must be a non-empty string")
    if image_path is not None and not isinstance(image_path, str):
        raise ItemError(f"image must be a path, got {json.dumps(image_path)}")
    given = dict(job.defaults)
    try:
        given.update(request_fields(fields))  # checked before the image is read
    except ValueError as exc:
        raise ItemError(str(exc)) from None
    if image_path is not None:
        image_path = job.image_path(image_path)
    elif modality in IMAGE_INPUT:
        image_path = job.image
    try:
        image = read_image(image_path)
        return GenerationRequest(modality, prompt, image=image, **given)
    except (UsageError, ValueError) as exc:
        raise ItemError(str(exc)) from None
    except Exception as exc:  # whatever else one item's image or values raise fails that item alone
        raise ItemError(f"{type(exc).__name__}: {exc}") from None


def failed_outcome(item: Item, job: JobInput, error: str) -> Outcome:
    """The record of an item that cannot run, with its modality and seed as asked (where valid)."""
    modality = item.fields.get("modality", job.modality)
    seed = item.fields.get("seed", job.defaults.get("seed", DEFAULT_SEED))
    try:
        seed = BY_NAME["seed"].check(seed)
    except ValueError:
        seed = None
    return Outcome.failed(item.id, error, modality if isinstance(modality, str) else None, seed)
