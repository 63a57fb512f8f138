"""A text prefill over an empty context (a chat prompt, a text2img prompt) replayed as a CUDA
graph, one graph per padded length.

Such a prefill reads the und expert's weights once for a few dozen tokens: ~6 ms of GPU work
on an H100, but 15-30 ms of wall time, because the host launches ~30 kernels a layer and the GPU
waits for them. It sits on the critical path of every chat and text2img request. Replayed as
one graph it costs about its GPU time.

The prompt is padded at its end to the next multiple of `bucket` tokens: under the causal mask
no real token sees a padded one, so the real rows' keys and values are those of the unpadded
prefill (up to the GEMM kernel cuBLAS picks for the padded row count: bf16 rounding), and the
padded rows are dropped. Graphs are captured on first use of a length and share one memory
pool; prompts longer than `max_tokens` prefill eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bagel_ray.engine.cuda_graph import capture
from bagel_ray.model.bagel import BagelModel
from bagel_ray.model.llm import KV, ForwardMode, PrefixKV


def padded_length(n: int, bucket: int) -> int:
    return -(-n // bucket) * bucket


def prefill_padded(model: BagelModel, ids: torch.Tensor) -> list[KV]:
    """The per-layer K/V ([1, P, kv, hd]) of a causal prefill of `ids` [P] (padded at the end)
    at positions 0..P-1 over an empty context."""
    positions = torch.arange(ids.shape[0], device=ids.device)[None]
    _, new_kv = model.llm(model.embed_tokens(ids)[None], positions, None, PrefixKV(None, causal=True), ForwardMode(gen=False))
    return new_kv


@dataclass
class _Graph:
    """A captured prefill and every tensor it reads or writes, held as long as the graph: a
    tensor made outside the capture and then freed would leave the graph reading memory the
    allocator has handed to something else."""

    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor  # [P], the graph's input
    kv: list[KV]  # the graph's outputs, overwritten by each replay


class PrefillGraphs:
    """The graphs of one model's empty-context text prefills, by padded length."""

    def __init__(self, model: BagelModel, bucket: int = 64, max_tokens: int = 1024) -> None:
        self.model = model
        self.bucket = bucket
        self.max_tokens = max_tokens
        self._graphs: dict[int, _Graph] = {}
        self._pool = None

    def prefill(self, ids: list[int]) -> list[KV] | None:
        """The per-layer K/V ([1, n, kv, hd] views of the graph's outputs: copy them before the
        next prefill) of `ids` at positions 0..n-1, or None when the prompt is too long."""
        n = len(ids)
        if not 0 < n <= self.max_tokens:
            return None
        length = padded_length(n, self.bucket)
        graph = self._graphs.get(length) or self._capture(length)
        graph.ids.copy_(torch.tensor(ids + [0] * (length - n), dtype=torch.long))
        graph.graph.replay()
        return [(k[:, :n], v[:, :n]) for k, v in graph.kv]

    def _capture(self, length: int) -> _Graph:
        device = self.model.device
        ids = torch.zeros(length, dtype=torch.long, device=device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph, kv = capture(lambda: prefill_padded(self.model, ids), device, pool=self._pool)
        self._graphs[length] = _Graph(graph, ids, kv)
        return self._graphs[length]
