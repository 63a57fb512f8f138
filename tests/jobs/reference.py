"""What the bulk-job tests share: a mixed input (all four modalities and two broken items),
the requests `LocalPipeline` runs for the same items, and the check of a job's output
folder against them.

A job denoises the images of a batch together, so its images equal the reference's within
`PIXEL_TOL`, not bit for bit (tests/determinism.py); its texts are compared exactly (greedy
tokens, decoded at the workers' thread count on both sides)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from bagel_ray.engine.pipeline import LocalPipeline
from bagel_ray.engine.request import GenerationRequest
from tests.determinism import assert_pixels_close, torch_threads, worker_thread_count


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    return path


def read_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as png:
        return np.asarray(png.convert("RGB"))


def mixed_input(folder: Path) -> tuple[Path, dict[str, GenerationRequest | None]]:
    """input.jsonl (with its image beside it) and, per id, the request LocalPipeline runs for
    it (None: the item is broken and must be recorded as failed)."""
    folder.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    (folder / "images").mkdir(exist_ok=True)
    picture.save(folder / "images" / "in.png")
    items = [
        ({"id": "t2t", "modality": "text2text", "prompt": "Tell me a fun fact about the moon.", "max_tokens": 8, "seed": 3},
         GenerationRequest("text2text", "Tell me a fun fact about the moon.", max_tokens=8, seed=3)),
        ({"id": "i2t", "modality": "img2text", "prompt": "What is in the picture?", "image": "images/in.png", "max_tokens": 6},
         GenerationRequest("img2text", "What is in the picture?", image=picture, max_tokens=6)),
        ({"id": "t2i", "modality": "text2img", "prompt": "A red fox sleeps under an old oak tree.", "height": 32, "width": 48,
          "steps": 5, "seed": 7, "cfg_img_scale": 1.5},
         GenerationRequest("text2img", "A red fox sleeps under an old oak tree.", height=32, width=48, num_inference_steps=5, seed=7,
                           cfg_img_scale=1.5)),
        ({"id": "t2i.think", "modality": "text2img", "prompt": "a castle", "think": True, "max_think_tokens": 5, "steps": 4,
          "height": 32, "width": 32, "seed": 2},
         GenerationRequest("text2img", "a castle", think=True, max_think_tokens=5, num_inference_steps=4, height=32, width=32, seed=2)),
        ({"id": "i2i", "modality": "img2img", "prompt": "Make the sky purple.", "image": "images/in.png", "steps": 4, "seed": 11},
         GenerationRequest("img2img", "Make the sky purple.", image=picture, num_inference_steps=4, seed=11)),
        ({"id": "broken-image", "modality": "img2img", "prompt": "x", "image": "images/missing.png"}, None),
        ({"id": "broken-steps", "modality": "text2img", "prompt": "x", "steps": "many", "height": 32, "width": 32}, None),
    ]
    return write_jsonl(folder / "input.jsonl", [item for item, _ in items]), {item["id"]: req for item, req in items}


@contextmanager
def reference_pipeline(model: Path | str) -> Iterator[LocalPipeline]:
    """The reference, run at the Ray workers' intra-op thread count (tests/determinism.py)."""
    with torch_threads(worker_thread_count()):
        yield LocalPipeline.from_pretrained(model, device="cpu", dtype="float32")


def assert_matches_local(out: Path, expected: dict[str, GenerationRequest | None], local: LocalPipeline) -> list[dict]:
    """One record per item; ok items equal LocalPipeline's output for the same request; broken
    ones failed with a reason. Returns the records."""
    records = read_records(out)
    assert sorted(r["id"] for r in records) == sorted(expected), records
    with torch_threads(worker_thread_count()):
        for record in records:
            req = expected[record["id"]]
            if req is None:
                assert record["status"] == "failed" and record["error"] and record["output"] is None, record
                assert not list(out.glob(f"{record['id']}.*"))
                continue
            assert record["status"] == "ok" and record["error"] is None, record
            assert record["seed"] == req.seed and record["modality"] == req.modality
            want = local.run(req)
            if req.outputs_image:
                assert record["output"] == f"{record['id']}.png"
                assert_pixels_close(pixels(out / record["output"]), want.image, record["id"])
                assert record.get("think_text") == want.think_text
            else:
                assert record["output"] == f"{record['id']}.txt"
                assert (out / record["output"]).read_text(encoding="utf-8") == want.text, record["id"]
                assert record["finish_reason"] == want.finish_reason
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    return records
