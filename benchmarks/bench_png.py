"""PNG encoding of a response image: PIL (zlib level 1, one thread) against `bagel_ray.png`
(the Up filter and deflate over threads), on this machine's CPUs.

    python -m benchmarks.bench_png [--sides 512,1024] [--reps 5] [--json FILE]

Images: uniform noise (what random weights give: barely compressible) and a smooth gradient.
Each row: milliseconds per encode (median of --reps) and the PNG's bytes, both encoders; the
decoded pixels are checked against the image.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time

import numpy as np
from PIL import Image

from bagel_ray.png import encode_png
from benchmarks.table import print_table


def images(side: int) -> dict[str, Image.Image]:
    rng = np.random.default_rng(side)
    yy, xx = np.mgrid[0:side, 0:side]
    smooth = np.stack([(xx // 2) % 256, (yy // 2) % 256, ((xx + yy) // 4) % 256], -1).astype(np.uint8)
    return {"noise": Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)), "smooth": Image.fromarray(smooth)}


def pil_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def timed(fn, reps: int) -> tuple[float, bytes]:
    out = fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", default="512,1024")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for side in (int(s) for s in args.sides.split(",")):
        for name, image in images(side).items():
            pil_s, pil_bytes = timed(lambda: pil_png(image), args.reps)
            ours_s, ours_bytes = timed(lambda: encode_png(image), args.reps)
            back = Image.open(io.BytesIO(ours_bytes))
            if not np.array_equal(np.asarray(back), np.asarray(image)):
                raise SystemExit(f"encode_png changed the pixels of the {side} {name} image")
            rows.append({"row": f"png_{name}_{side}", "seconds": ours_s, "pil_seconds": pil_s,
                         "bytes": len(ours_bytes), "pil_bytes": len(pil_bytes)})
            print(rows[-1], flush=True)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
