"""The routing table (`bagel_ray.routes`): which stages each modality visits and what each
stage loads, checked against the model parts the stages need, and a made-up modality reaching
every reader from its one entry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from bagel_ray import routes
from bagel_ray.routes import DIT, THINKER, modality_for, route, stage_parts, visits
from tests.conftest import REPO_ROOT

UND, LM_HEAD, VIT, GEN, GEN_HEADS, VAE = "und", "lm_head", "vit", "gen", "gen_heads", "vae"


@pytest.mark.parametrize("edit_contexts_on, thinker, dit", [
    # edits on the DiT: the Thinker never sees an image request's VAE; the DiT builds edit
    # contexts (ViT, think text) itself
    (DIT, {UND, LM_HEAD, VIT}, {UND, LM_HEAD, VIT, GEN, GEN_HEADS, VAE}),
    # edits on the Thinker: it VAE-encodes their input (gen rows); the DiT only denoises
    (THINKER, {UND, LM_HEAD, VIT, GEN, GEN_HEADS, VAE}, {UND, GEN, GEN_HEADS, VAE}),
])
def test_stage_parts(edit_contexts_on, thinker, dit):
    assert stage_parts(THINKER, edit_contexts_on) == thinker
    assert stage_parts(DIT, edit_contexts_on) == dit


def test_parts_are_the_models():
    from bagel_ray.model.bagel import PARTS, THINKER_PARTS

    assert set().union(*routes.WORK_PARTS.values()) == PARTS
    assert stage_parts(THINKER, DIT) == THINKER_PARTS


@pytest.mark.parametrize("modality, on_dit, on_thinker", [
    ("text2text", (THINKER,), (THINKER,)),
    ("img2text", (THINKER,), (THINKER,)),
    ("text2img", (THINKER, DIT), (THINKER, DIT)),
    ("img2img", (DIT,), (THINKER, DIT)),
])
def test_stages_per_modality(modality, on_dit, on_thinker):
    assert route(modality).stages(DIT) == on_dit
    assert route(modality).stages(THINKER) == on_thinker


def test_lookups():
    assert [modality_for(i, o) for i, o in ((False, False), (True, False), (False, True), (True, True))] == [
        "text2text", "img2text", "text2img", "img2img"]
    assert visits(THINKER, DIT) == {"text2text", "img2text", "text2img"}
    assert visits(DIT, DIT) == {"text2img", "img2img"}
    assert [m for m in routes.MODALITIES if route(m).size_from_input] == ["img2img"]
    with pytest.raises(ValueError, match="unknown modality 'text2video'"):
        route("text2video")


# A new modality is one entry here plus its engine code: the request model, the CLI, the bulk
# job and the stage part sets pick it up from the table.
MADE_UP = textwrap.dedent('''
    import json
    from bagel_ray import routes
    routes.ROUTES["text2caption"] = routes.Route("text2caption", image_in=False, image_out=False,
                                                 context=("prefill_text", "decode_text"), context_on=routes.THINKER)
    routes.MODALITIES = tuple(routes.ROUTES)
    routes.TEXT_OUTPUT = routes.TEXT_OUTPUT + ("text2caption",)
    from bagel_ray.cli import build_parser
    from bagel_ray.engine.request import GenerationRequest
    from bagel_ray.jobs import data_runner
    args = build_parser().parse_args(["generate", "--modality", "text2caption", "--prompts", "x"])
    req = GenerationRequest(args.modality, "x")
    print(json.dumps({"cli": args.modality, "text_out": not req.outputs_image,
                      "bulk_thinker": "text2caption" in data_runner.THINKER_WORK}))
''')


def test_a_modality_added_to_the_table_reaches_its_readers():
    proc = subprocess.run([sys.executable, "-c", MADE_UP], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"cli": "text2caption", "text_out": True, "bulk_thinker": True}
