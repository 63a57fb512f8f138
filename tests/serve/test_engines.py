"""The Serve stages' engine factories (`serve/engines.py`) on the tiny model: the device and
dtype a stage resolves to, and which engines each stage's pipeline holds."""

from __future__ import annotations

import pytest
import torch

from bagel_ray.routes import DIT, THINKER, stage_parts
from bagel_ray.serve.config import AppConfig
from bagel_ray.serve.engines import dit_engine, dit_parts, rank_dit, resolve_device, thinker_engine, thinker_parts


@pytest.mark.skipif(torch.cuda.is_available(), reason="`auto` resolves to CUDA here")
def test_auto_is_the_cpu_in_float32_without_cuda():
    stage = AppConfig().thinker
    assert (stage.device, stage.dtype) == ("auto", "auto")
    assert resolve_device(stage) == ("cpu", torch.float32)
    assert resolve_device(stage.model_copy(update={"dtype": "bfloat16"})) == ("cpu", torch.bfloat16)


@pytest.mark.parametrize("edit_contexts_on", [THINKER, DIT])
def test_each_stage_builds_only_the_engines_its_work_needs(tiny_cache, edit_contexts_on):
    app = AppConfig.model_validate({"model": "tiny", "edit_contexts_on": edit_contexts_on,
                                    "thinker": {"device": "cpu"}, "dit": {"device": "cpu"}})
    assert thinker_parts(app) == stage_parts(THINKER, edit_contexts_on)
    assert dit_parts(app) == stage_parts(DIT, edit_contexts_on)
    thinker = thinker_engine(app)
    assert thinker.thinker is not None and thinker.dit is None
    dit = dit_engine(app)
    assert dit.dit is not None and dit.dit.cuda_graphs
    assert (dit.thinker is not None) == (edit_contexts_on == DIT)  # img2img contexts built on the DiT
    rank = rank_dit(app)
    assert rank.cuda_graphs and rank.model.device == torch.device("cpu")  # as rank 0's: dit.parallel.cuda_graphs decides
