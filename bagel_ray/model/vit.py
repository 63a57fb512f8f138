"""SigLIP NaViT encoder and the ViT->LLM connector (spec section 4).

The patch embedding is a Linear over 14x14x3 patch vectors (the checkpoint stores it that
way); images are packed along one sequence and attend only within themselves.
Official prefixes: `vit_model.vision_model` and `connector`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bagel_ray.model.attention import attend
from bagel_ray.model.config import ViTConfig


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed and returned in fp32, as under the reference's CUDA autocast (spec 11.6)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)


class SiglipAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        N = x.shape[0]
        q, k, v = (proj(x).view(N, self.heads, -1).transpose(0, 1) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = attend(q[None], k[None], v[None], attn_mask, flash=True)[0]  # image sizes vary: no per-length plan
        return self.out_proj(out.transpose(0, 1).reshape(N, -1))


class SiglipMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.layer_norm1 = LayerNorm32(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg.hidden_size, cfg.num_attention_heads)
        self.layer_norm2 = LayerNorm32(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        dtype = x.dtype
        x = x + self.self_attn(self.layer_norm1(x).to(dtype), attn_mask)
        return x + self.mlp(self.layer_norm2(x).to(dtype))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.num_layers))


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig, max_patches_per_side: int) -> None:
        super().__init__()
        self.patch_embedding = nn.Linear(cfg.patch_dim, cfg.hidden_size)
        self.position_embedding = nn.Embedding(max_patches_per_side**2, cfg.hidden_size)


class SiglipVisionModel(nn.Module):
    """`vit_model.vision_model`: embeddings, 26 pre-LN layers, post-layernorm, no head."""

    def __init__(self, cfg: ViTConfig, max_patches_per_side: int) -> None:
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg, max_patches_per_side)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = LayerNorm32(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        """patches [M, patch_dim] of one or more images packed in order, with their flattened
        position ids [M] and per-image lengths; returns post-LN features [M, hidden] (fp32)."""
        dtype = self.embeddings.patch_embedding.weight.dtype
        x = self.embeddings.patch_embedding(patches.to(dtype)) + self.embeddings.position_embedding(position_ids)
        mask = None
        if len(seq_lens) > 1:
            image_of = torch.repeat_interleave(torch.arange(len(seq_lens), device=x.device), torch.tensor(seq_lens, device=x.device))
            mask = image_of[:, None] == image_of[None, :]
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return self.post_layernorm(x)


class ViTHolder(nn.Module):
    """Gives the official `vit_model.vision_model` prefix."""

    def __init__(self, cfg: ViTConfig, max_patches_per_side: int) -> None:
        super().__init__()
        self.vision_model = SiglipVisionModel(cfg, max_patches_per_side)


class Connector(nn.Module):
    """MLP from ViT width to LLM width (`connector.fc1`, `connector.fc2`, GELU-tanh)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.fc1.weight.dtype)
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))
