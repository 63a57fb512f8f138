"""The layout of `ImageContexts` without their tensors: what every transport sends ahead of
(or instead of) the K/V bytes so the receiver can rebuild the contexts.

A handoff carries one tensor per context, each [layers, 2, T, kv_heads, head_dim] with every
layer in it: `gen`, and `cfg_img` when it is a context of its own (img2img). The prefix CFG
branches (`cfg_text` always, `cfg_img` in text2img) travel as cut points, never as copies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bagel_ray.engine.kv_context import Cut, ImageContexts, KVContext

DTYPES = {str(d): d for d in (torch.bfloat16, torch.float16, torch.float32)}


@dataclass(frozen=True)
class ContextsLayout:
    dtype: str
    shapes: tuple[tuple[int, ...], ...]  # gen's, then cfg_img's when it is its own context
    gen_rope: int
    cfg_text: Cut
    cfg_img: Cut | int  # a cut of gen, or the next RoPE position of cfg_img's own context
    height: int
    width: int

    @staticmethod
    def of(contexts: ImageContexts) -> "ContextsLayout":
        own = isinstance(contexts.cfg_img, KVContext)
        shapes = (tuple(contexts.gen.kv.shape),) + ((tuple(contexts.cfg_img.kv.shape),) if own else ())
        cfg_img = contexts.cfg_img.rope if own else contexts.cfg_img
        return ContextsLayout(str(contexts.gen.kv.dtype), shapes, contexts.gen.rope, contexts.cfg_text, cfg_img,
                              contexts.height, contexts.width)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def sizes(self) -> tuple[int, ...]:
        """Bytes of each context tensor."""
        itemsize = self.torch_dtype.itemsize
        return tuple(math.prod(shape) * itemsize for shape in self.shapes)

    @property
    def nbytes(self) -> int:
        return sum(self.sizes)

    @staticmethod
    def tensors(contexts: ImageContexts) -> list[torch.Tensor]:
        """The context tensors in layout order, each contiguous (a view of the context's own
        tensor when it already is, as the engines make them)."""
        own = [contexts.gen.kv] + ([contexts.cfg_img.kv] if isinstance(contexts.cfg_img, KVContext) else [])
        return [t.contiguous() for t in own]

    def region(self, branch: str) -> tuple[int, int, int]:
        """Where a CFG branch's context lies in the handoff: (index of its context tensor, its
        first rows taken, its next RoPE position), as `ImageContexts.branch` cuts it."""
        if branch == "cond":
            return 0, self.shapes[0][2], self.gen_rope
        if branch == "cfg_text":
            return 0, self.cfg_text.length, self.cfg_text.rope
        if branch == "cfg_img":
            return (0, self.cfg_img.length, self.cfg_img.rope) if isinstance(self.cfg_img, Cut) else (
                1, self.shapes[1][2], self.cfg_img)
        raise ValueError(f"unknown branch {branch!r}")

    def piece_shape(self, branch: str, group: int, parts: int) -> tuple[int, ...]:
        """The shape of a branch's KV heads `group` of `parts` (`piece`)."""
        index, length, _ = self.region(branch)
        layers, two, _, heads, head_dim = self.shapes[index]
        return layers, two, length, heads // parts, head_dim

    def piece(self, tensors: list[torch.Tensor], branch: str, group: int, parts: int) -> tuple[torch.Tensor, int]:
        """A branch's rows with its KV heads `group` of `parts` (a worker rank's share of it), as
        a view of `tensors` (this layout's, or mapped from the sender), and its next RoPE
        position."""
        index, length, rope = self.region(branch)
        per = self.shapes[index][3] // parts
        return tensors[index][:, :, :length, group * per : (group + 1) * per], rope

    def empty(self, device: torch.device) -> list[torch.Tensor]:
        return [torch.empty(shape, dtype=self.torch_dtype, device=device) for shape in self.shapes]

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The context tensors over the start of `flat` (bytes, at least `nbytes`), one after
        the other: what a receive fills in place."""
        out, start = [], 0
        for shape, size in zip(self.shapes, self.sizes):
            out.append(flat[start:start + size].view(self.torch_dtype).view(shape))
            start += size
        return out

    def assemble(self, tensors: list[torch.Tensor]) -> ImageContexts:
        """The contexts over `tensors` (in layout order), without copying them."""
        if len(tensors) != len(self.shapes):
            raise ValueError(f"{len(tensors)} tensors for a layout of {len(self.shapes)} contexts")
        for t, shape in zip(tensors, self.shapes):
            if tuple(t.shape) != shape or t.dtype != self.torch_dtype:
                raise ValueError(f"tensor {tuple(t.shape)} {t.dtype} does not match the layout's {shape} {self.dtype}")
        gen = KVContext(tensors[0], self.gen_rope)
        cfg_img = self.cfg_img if isinstance(self.cfg_img, Cut) else KVContext(tensors[1], self.cfg_img)
        return ImageContexts(gen, self.cfg_text, cfg_img, self.height, self.width)
