"""Which stages each modality visits, what each stage does for it, and so which model parts
each stage loads: one table, read by the request model, the Serve driver and stages, the bulk
job, the CLI and the client.

Why one table: the path of a modality used to be written out in eight places (the driver's two
call graphs, the bulk job's Thinker work set, two stage part sets, the CLI, the client, the HTTP
schema), so a new modality meant finding all of them. Now it is one `Route` here plus its
engine code; what a stage loads follows from the work its routes give it (`stage_parts`).

The Thinker always decodes text (answers and think text) and builds the context of a text2img
request; the DiT denoises and VAE-decodes. Where an edit's context (VAE + ViT + text) is built
is the app's `edit_contexts_on` ("dit": on the DiT, no KV handoff; "thinker": handed over like
text2img's). Imports nothing but the standard library (the CPU-only ingress reads it).
"""

from __future__ import annotations

from dataclasses import dataclass

THINKER, DIT = "thinker", "dit"
CONFIGURED = "edit_contexts_on"  # contexts built where the app's `edit_contexts_on` says

# The model parts (model/bagel.py PARTS) each piece of work needs.
WORK_PARTS: dict[str, frozenset[str]] = {
    "prefill_text": frozenset({"und"}),  # the prompt's tokens into the KV context
    "decode_text": frozenset({"und", "lm_head"}),  # text answers and think text
    "vit_in": frozenset({"und", "vit"}),  # an input image's ViT tokens
    "vae_in": frozenset({"und", "gen", "gen_heads", "vae"}),  # an input image's VAE latents (gen expert rows)
    "denoise": frozenset({"und", "gen", "gen_heads"}),  # the markers run on und, the latents on gen
    "vae_out": frozenset({"vae"}),
}


@dataclass(frozen=True)
class Route:
    """One modality. `context` is the work that builds its KV context (and its text, for text
    output), done on the stage `context_on`; image output adds the DiT's `DENOISE` work."""

    modality: str
    image_in: bool
    image_out: bool
    context: tuple[str, ...]
    context_on: str  # THINKER, DIT or CONFIGURED

    @property
    def size_from_input(self) -> bool:
        """The output image takes the input's (VAE-resized) size: no height/width/size."""
        return self.image_in and self.image_out

    def context_stage(self, edit_contexts_on: str) -> str:
        return edit_contexts_on if self.context_on == CONFIGURED else self.context_on

    def stages(self, edit_contexts_on: str) -> tuple[str, ...]:
        """The stages a request visits, in order: its context's, then the DiT for an image."""
        first = self.context_stage(edit_contexts_on)
        return (first, DIT) if self.image_out and first != DIT else (first,)

    def work(self, stage: str, edit_contexts_on: str) -> tuple[str, ...]:
        """What `stage` does for this modality (empty if it is not visited)."""
        work = self.context if self.context_stage(edit_contexts_on) == stage else ()
        if self.image_out and stage == DIT:
            work += DENOISE
        return work


DENOISE = ("denoise", "vae_out")

ROUTES: dict[str, Route] = {r.modality: r for r in (
    # think text, when asked, is decoded where the context is built (decode_text)
    Route("text2img", image_in=False, image_out=True, context=("prefill_text", "decode_text"), context_on=THINKER),
    Route("img2img", image_in=True, image_out=True, context=("vae_in", "vit_in", "prefill_text", "decode_text"),
          context_on=CONFIGURED),
    Route("img2text", image_in=True, image_out=False, context=("vit_in", "prefill_text", "decode_text"), context_on=THINKER),
    Route("text2text", image_in=False, image_out=False, context=("prefill_text", "decode_text"), context_on=THINKER),
)}

MODALITIES = tuple(ROUTES)
IMAGE_OUTPUT = tuple(m for m, r in ROUTES.items() if r.image_out)
IMAGE_INPUT = tuple(m for m, r in ROUTES.items() if r.image_in)
TEXT_OUTPUT = tuple(m for m, r in ROUTES.items() if not r.image_out)


def route(modality: str) -> Route:
    try:
        return ROUTES[modality]
    except KeyError:
        raise ValueError(f"unknown modality {modality!r}; choose from {', '.join(MODALITIES)}") from None


def modality_for(image_in: bool, image_out: bool) -> str:
    """The modality of a request with (or without) an input image, asking for an image (or text)."""
    return next(m for m, r in ROUTES.items() if (r.image_in, r.image_out) == (image_in, image_out))


def visits(stage: str, edit_contexts_on: str) -> frozenset[str]:
    """The modalities whose requests visit `stage`."""
    return frozenset(m for m, r in ROUTES.items() if stage in r.stages(edit_contexts_on))


def stage_parts(stage: str, edit_contexts_on: str) -> frozenset[str]:
    """The model parts `stage` loads: what the work of every route visiting it needs."""
    parts: set[str] = set()
    for r in ROUTES.values():
        for work in r.work(stage, edit_contexts_on):
            parts |= WORK_PARTS[work]
    return frozenset(parts)
