"""Building KV contexts: text segments, ViT image blocks and VAE image blocks (spec 3.6, 4, 5).

Both stages build contexts (the Thinker for text and ViT blocks, whichever stage holds the
generation expert and the VAE for VAE blocks), so the block logic lives here once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from bagel_ray.engine.kv_context import KVContext
from bagel_ray.engine.prefill_graphs import PrefillGraphs
from bagel_ray.model import kernels
from bagel_ray.model.bagel import BagelModel
from bagel_ray.model.image_transforms import grid_position_ids, latent_to_tokens, resize, to_rgb, to_tensor, vit_patchify
from bagel_ray.model.llm import ExpertRows, ForwardMode, PrefixKV, attention_mask
from bagel_ray.model.tokenizer import BagelTokenizer
from bagel_ray.model.vae import AutoEncoder

VLM_THINK_SYSTEM_PROMPT = (
    "You should first think about the reasoning process in the mind and then provide the user with the answer. \n"
    "The reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning process here </think> answer here"
)
GEN_THINK_SYSTEM_PROMPT = (
    "You should first think about the planning process in the mind and then generate the image. \n"
    "The planning process is enclosed within <think> </think> tags, i.e. <think> planning process here </think> image here"
)


def run_block(
    model: BagelModel,
    ctx: KVContext,
    embeds: torch.Tensor,
    positions: torch.Tensor,
    rows: ExpertRows | None,
    causal: bool,
    mode: ForwardMode,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """One LLM forward of a block of N rows over one context (batch 1). Returns the hidden
    states [N, D] and this block's per-layer K/V."""
    past = [(k[None], v[None]) for k, v in (ctx.layer(i) for i in range(ctx.kv.shape[0]))] if ctx.length else None
    hidden, new_kv = model.llm(embeds[None], positions[None], rows, PrefixKV(past, causal=causal), mode)
    return hidden[0], new_kv


@dataclass(frozen=True)
class VitBlock:
    """What a ViT block computed, kept for inspection (golden tests, stats)."""

    patches: torch.Tensor
    position_ids: torch.Tensor
    features: torch.Tensor
    rows: torch.Tensor


@dataclass(frozen=True)
class VaeBlock:
    latent: torch.Tensor
    position_ids: torch.Tensor


class ContextBuilder:
    """Appends blocks to KV contexts with one model. Needs the `vit` part for ViT blocks and
    the `gen` + `gen_heads` parts plus a VAE for VAE blocks. With `cuda_graphs` on a GPU, a
    prompt (a text segment on an empty context) replays a CUDA graph (`prefill_graphs`)."""

    def __init__(self, model: BagelModel, tokenizer: BagelTokenizer, vae: AutoEncoder | None = None,
                 cuda_graphs: bool = False) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.vae = vae
        self.cfg = model.cfg
        self.cuda_graphs = cuda_graphs
        self._prefill_graphs: PrefillGraphs | None = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    def empty(self) -> KVContext:
        llm = self.cfg.llm
        return KVContext.empty(llm.num_hidden_layers, llm.num_key_value_heads, llm.head_dim, self.model.dtype, self.device)

    def _positions(self, rope: int, n: int, same: bool) -> torch.Tensor:
        if same:
            return torch.full((n,), rope, dtype=torch.long, device=self.device)
        return torch.arange(rope, rope + n, dtype=torch.long, device=self.device)

    def append_text(self, ctx: KVContext, text: str) -> KVContext:
        """`<|im_start|> text <|im_end|>` at consecutive positions, causal, und expert."""
        return self.append_tokens(ctx, self.tokenizer.text_segment(text))

    @torch.inference_mode()
    def append_tokens(self, ctx: KVContext, segment: list[int]) -> KVContext:
        """A text segment already tokenized (`tokenizer.text_segment`; a prompt is tokenized
        once, where its length is checked). On an empty context with `cuda_graphs` on, the
        prefill replays a CUDA graph (a prompt's prefill, ~20 ms eagerly on an H100, is ~7 ms
        replayed)."""
        if (self.cuda_graphs and ctx.length == 0 and ctx.rope == 0 and self.device.type == "cuda"
                and not kernels.in_eager()):
            if self._prefill_graphs is None:
                self._prefill_graphs = PrefillGraphs(self.model)
            new_kv = self._prefill_graphs.prefill(segment)
            if new_kv is not None:
                return ctx.append(new_kv, len(segment))
        ids = torch.tensor(segment, dtype=torch.long, device=self.device)
        _, new_kv = run_block(self.model, ctx, self.model.embed_tokens(ids), self._positions(ctx.rope, len(ids), False), None, True, ForwardMode(gen=False))
        return ctx.append(new_kv, len(ids))

    def append_text_batch(self, contexts: list[KVContext], texts: list[str]) -> list[KVContext]:
        """`append_text(contexts[b], texts[b])` for every b, in one forward."""
        return self.append_tokens_batch(contexts, [self.tokenizer.text_segment(text) for text in texts])

    @torch.inference_mode()
    def append_tokens_batch(self, contexts: list[KVContext], segments: list[list[int]]) -> list[KVContext]:
        """`append_tokens(contexts[b], segments[b])` for every b, in one forward instead of one per
        context: a forward reads all the weights and launches every kernel once, whatever the
        batch, so a burst of arriving prompts costs about one prefill. Segments are padded to
        the longest and contexts to the longest; a mask keeps each sample to its own rows (over
        empty contexts the causal mask does), and each returned context keeps only its real rows."""
        if len(contexts) != len(segments):
            raise ValueError(f"{len(contexts)} contexts but {len(segments)} segments")
        if len(contexts) <= 1:
            return [self.append_tokens(ctx, segment) for ctx, segment in zip(contexts, segments)]
        dev = self.device
        ids = segments
        new_lens = [len(row) for row in ids]
        past_lens = [ctx.length for ctx in contexts]
        n, t = max(new_lens), max(past_lens)
        tokens = torch.tensor([row + [0] * (n - len(row)) for row in ids], dtype=torch.long, device=dev)
        positions = torch.stack([self._positions(ctx.rope, n, False) for ctx in contexts])
        if t:
            padded = torch.stack([F.pad(ctx.kv, (0, 0, 0, 0, 0, t - ctx.length)) for ctx in contexts])  # [B, L, 2, T, kv, hd]
            past = [(padded[:, i, 0], padded[:, i, 1]) for i in range(padded.shape[1])]
            mask = attention_mask(torch.tensor(past_lens, device=dev), t, torch.tensor(new_lens, device=dev), n, causal=True)
            attention = PrefixKV(past, mask)
        else:  # prompts padded at their end: under the causal mask no real row sees a padded one
            attention = PrefixKV(None, causal=True)
        _, new_kv = self.model.llm(self.model.embed_tokens(tokens), positions, None, attention, ForwardMode(gen=False))
        return [ctx.append([(k[b : b + 1, :m], v[b : b + 1, :m]) for k, v in new_kv], m)
                for b, (ctx, m) in enumerate(zip(contexts, new_lens))]

    def _marked(self, rows: torch.Tensor) -> torch.Tensor:
        """[<|vision_start|>] + rows + [<|vision_end|>]."""
        tok = self.tokenizer
        markers = self.model.embed_tokens(torch.tensor([tok.start_of_image, tok.end_of_image], device=self.device))
        return torch.cat((markers[:1], rows.to(markers.dtype), markers[1:]))

    @torch.inference_mode()
    def vit_block(self, image: Image.Image) -> VitBlock:
        """ViT rows of an image, resized by the ViT rule (the caller applies the VAE resize first
        where the official inferencer does)."""
        cfg = self.cfg
        pixels = to_tensor(resize(to_rgb(image), cfg.vit_transform)).to(self.device)
        patches = vit_patchify(pixels, cfg.vit.patch_size)
        grid_h, grid_w = pixels.shape[1] // cfg.vit.patch_size, pixels.shape[2] // cfg.vit.patch_size
        pos = grid_position_ids(grid_h, grid_w, cfg.vit_max_num_patch_per_side).to(self.device)
        features, rows = self.model.vit_embeds(patches, pos)
        return VitBlock(patches, pos, features, rows)

    @torch.inference_mode()
    def append_vit(self, ctx: KVContext, image: Image.Image) -> KVContext:
        """A ViT block: markers and image rows at one position, bidirectional, und expert."""
        rows = self._marked(self.vit_block(image).rows)
        _, new_kv = run_block(self.model, ctx, rows, self._positions(ctx.rope, rows.shape[0], True), None, False, ForwardMode(gen=False))
        return ctx.append(new_kv, 1)

    @torch.inference_mode()
    def vae_block(self, image: Image.Image, generator: torch.Generator | None = None, eps: torch.Tensor | None = None) -> VaeBlock:
        """Encode an image already at its VAE size; the posterior is sampled (spec 5.2) with
        `eps` or from `generator` (CPU, so seeds match the official draws)."""
        if self.vae is None:
            raise RuntimeError("this stage has no VAE: VAE context blocks need the 'vae' part")
        vae_dev = next(self.vae.parameters()).device
        pixels = to_tensor(to_rgb(image))[None].to(vae_dev, next(self.vae.parameters()).dtype)
        latent = self.vae.encode(pixels, eps=eps, generator=generator)
        p = self.cfg.latent_patch_size
        h, w = latent.shape[2] // p, latent.shape[3] // p
        return VaeBlock(latent, grid_position_ids(h, w, self.cfg.max_latent_size))

    @torch.inference_mode()
    def append_vae(self, ctx: KVContext, image: Image.Image, generator: torch.Generator | None = None, eps: torch.Tensor | None = None) -> KVContext:
        """A clean VAE block (t = 0): latents on the gen expert, markers on und, one position,
        bidirectional, in the gen precision path."""
        block = self.vae_block(image, generator, eps)
        tokens = latent_to_tokens(block.latent, self.cfg.latent_patch_size).to(self.device)
        t0 = torch.zeros(1, device=self.device)
        rows = self._marked(self.model.latent_embeds(tokens, t0, block.position_ids.to(self.device)))
        experts = ExpertRows.block_markers(1, rows.shape[0], self.device)
        _, new_kv = run_block(self.model, ctx, rows, self._positions(ctx.rope, rows.shape[0], True), experts, False, ForwardMode(gen=True))
        return ctx.append(new_kv, 1)
