"""The BAGEL network as one module tree whose names follow the official checkpoint
(`language_model`, `vit_model`, `connector`, `vit_pos_embed`, `time_embedder`, `vae2llm`,
`llm2vae`, `latent_pos_embed`). A stage builds only the parts it needs (`parts`), so a
Thinker never allocates the generation expert. The VAE lives apart (`ae.safetensors`).

The methods below turn inputs into the embedding rows of a block; running the LLM over
them, and keeping the K/V, is the engines' job.
"""

from __future__ import annotations

import torch
from torch import nn

from bagel_ray.model.kernels.gemv import linear
from bagel_ray.model.config import BagelConfig
from bagel_ray.model.heads import PositionTable, TimestepEmbedder
from bagel_ray.model.llm import MoTLanguageModel
from bagel_ray.model.vit import Connector, ViTHolder

# What a stage may load. "und" is the embedding, the und expert and its final norm.
PARTS = frozenset({"und", "lm_head", "gen", "gen_heads", "vit", "vae"})
THINKER_PARTS = frozenset({"und", "lm_head", "vit"})
DIT_PARTS = frozenset({"und", "gen", "gen_heads", "vit", "vae"})
ALL_PARTS = PARTS


class CausalLM(nn.Module):
    """`language_model`: the MoT backbone plus the untied text head."""

    def __init__(self, cfg: BagelConfig, parts: frozenset[str]) -> None:
        super().__init__()
        llm = cfg.llm
        self.model = MoTLanguageModel(llm, with_gen="gen" in parts)
        self.lm_head = nn.Linear(llm.hidden_size, llm.vocab_size, bias=False) if "lm_head" in parts else None


class BagelModel(nn.Module):
    def __init__(self, cfg: BagelConfig, parts: frozenset[str] = ALL_PARTS) -> None:
        super().__init__()
        unknown = set(parts) - PARTS
        if unknown:
            raise ValueError(f"unknown model parts {sorted(unknown)}; choose from {sorted(PARTS)}")
        if "und" not in parts:
            raise ValueError("every stage needs the 'und' part (embeddings and image markers)")
        self.cfg = cfg
        self.parts = frozenset(parts)
        d = cfg.llm.hidden_size
        self.language_model = CausalLM(cfg, self.parts)
        if "vit" in parts:
            self.vit_model = ViTHolder(cfg.vit, cfg.vit_max_num_patch_per_side)
            self.connector = Connector(cfg.vit.hidden_size, d)
            self.vit_pos_embed = PositionTable(cfg.vit_max_num_patch_per_side, d)
        if "gen_heads" in parts:
            self.time_embedder = TimestepEmbedder(d, cfg.timestep_embed_dim)
            self.vae2llm = nn.Linear(cfg.patch_latent_dim, d)
            self.llm2vae = nn.Linear(d, cfg.patch_latent_dim)
            self.latent_pos_embed = PositionTable(cfg.max_latent_size, d)

    @property
    def llm(self) -> MoTLanguageModel:
        return self.language_model.model

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.llm.embed_tokens.weight.device

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.embed_tokens(ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.language_model.lm_head is None:
            raise RuntimeError("this model was loaded without the lm_head part")
        return linear(hidden, self.language_model.lm_head.weight)

    def vit_embeds(self, patches: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's ViT rows for the LLM: (encoder output, connector + vit_pos_embed)."""
        features = self.vit_model.vision_model(patches, position_ids, [patches.shape[0]])
        rows = self.connector(features) + self.vit_pos_embed(position_ids)
        return features, rows.to(self.dtype)

    def latent_embeds(self, tokens: torch.Tensor, timesteps: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """vae2llm(x) + time_embedder(t) + latent_pos_embed[ids], summed in that order (spec 5.3)."""
        x = self.vae2llm(tokens.to(self.vae2llm.weight.dtype))
        x = x + self.time_embedder(timesteps)
        x = x + self.latent_pos_embed(position_ids)
        return x.to(self.dtype)

    def velocity(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.llm2vae(hidden)
