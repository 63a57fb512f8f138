"""The summary table the benchmark scripts print after their rows."""

from __future__ import annotations

# a row's headline figure: the first of these keys it has
FIGURES = (("tflops", "{:.0f} TFLOP/s"), ("images_per_s", "{:.2f} images/s"), ("tok_per_s", "{:.0f} tok/s"),
           ("speedup", "{:.2f}x the baseline of its run"))


def print_table(rows: list[dict]) -> None:
    print("\n| row | seconds | figure |\n|---|---:|---|")
    for r in rows:
        figure = next((fmt.format(r[key]) for key, fmt in FIGURES if key in r), "")
        print(f"| {r['row']} | {r['seconds']:.3f} | {figure} |")
