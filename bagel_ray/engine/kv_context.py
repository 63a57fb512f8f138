"""The KV context: the unit the Thinker and the DiT exchange (spec section 9).

All layers live in one contiguous tensor [layers, 2 (K, V), T, kv_heads, head_dim], keys after
QK-norm and RoPE, so a context moves between processes as one buffer. `rope` is the next
position id; it differs from `length` once images are in the context (an image block takes
one position). Contexts are immutable: appending returns a new one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Cut:
    """A prefix of a context: its first `length` rows, with next position `rope`."""

    length: int
    rope: int


@dataclass(frozen=True)
class KVContext:
    kv: torch.Tensor  # [layers, 2, T, kv_heads, head_dim]
    rope: int

    @staticmethod
    def empty(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> "KVContext":
        return KVContext(torch.empty(layers, 2, 0, kv_heads, head_dim, dtype=dtype, device=device), 0)

    @property
    def length(self) -> int:
        return self.kv.shape[2]

    @property
    def cut(self) -> Cut:
        return Cut(self.length, self.rope)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of layer i, [T, kv_heads, head_dim] each."""
        return self.kv[i, 0], self.kv[i, 1]

    def append(self, new_kv: list[tuple[torch.Tensor, torch.Tensor]], positions_used: int) -> "KVContext":
        """A new context with this call's per-layer K/V ([1, N, kv, hd] each) appended and the
        next position advanced by `positions_used`."""
        new = torch.stack([torch.stack((k[0], v[0])) for k, v in new_kv])
        return KVContext(torch.cat((self.kv, new.to(self.kv.dtype)), dim=2), self.rope + positions_used)

    def prefix(self, cut: Cut) -> "KVContext":
        if cut.length > self.length:
            raise ValueError(f"cut of {cut.length} rows beyond a context of {self.length}")
        return KVContext(self.kv[:, :, : cut.length], cut.rope)


@dataclass(frozen=True)
class ImageContexts:
    """What image generation attends to (spec 6.1): the full condition `gen`, the
    `cfg_text` branch (always a prefix of gen: a cut), and the `cfg_img` branch (a cut in
    text2img; its own context in edits, whose prompt sits at other positions), plus the
    output size in pixels."""

    gen: KVContext
    cfg_text: Cut
    cfg_img: Cut | KVContext
    height: int
    width: int

    def branch(self, name: str) -> KVContext:
        if name == "cond":
            return self.gen
        if name == "cfg_text":
            return self.gen.prefix(self.cfg_text)
        if name == "cfg_img":
            return self.cfg_img if isinstance(self.cfg_img, KVContext) else self.gen.prefix(self.cfg_img)
        raise ValueError(f"unknown branch {name!r}")

    def same_as_gen(self, name: str) -> bool:
        """True when a branch's context equals gen's (text2img's cfg_img without think), so its
        velocity equals the conditional one and need not be computed."""
        cut = self.cfg_text if name == "cfg_text" else self.cfg_img
        return isinstance(cut, Cut) and cut == self.gen.cut

    @property
    def nbytes(self) -> int:
        extra = self.cfg_img.nbytes if isinstance(self.cfg_img, KVContext) else 0
        return self.gen.nbytes + extra
