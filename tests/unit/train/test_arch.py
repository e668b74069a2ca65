"""Every architecture adapter computes exactly what the model itself computes, whole and split at any block."""

from __future__ import annotations

import mlx.core as mx
import pytest

from finetune.train.arch import ARCHS, arch_logits, arch_of, run_blocks
from tests import noise
from tests.unit.train.test_shortcuts import CONFIGS, build

# The adapters run the model's own ops in its own shapes: they agree bitwise here. k = 4 x the model's float32
# rounding (its logits vs its float64 twin's) allows a reassociation, not a missing norm or scale (>= 1e-3).
K = 4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_adapter_logits_equal_the_models_whole_and_split(name):
    model = build(name)
    arch = arch_of(model)
    assert arch is ARCHS[CONFIGS[name]["model_type"]]
    ids = mx.array([[(5 * i + 2) % 300 + 1 for i in range(20)]], dtype=mx.int32)
    ref = model(ids)
    with noise.as_float64(model):
        floor = noise.rel_max(ref, model(ids))
    noise.within(f"{name} adapter logits", noise.rel_max(arch_logits(model, arch, ids), ref), floor, K)
    n = len(arch.blocks(model))
    h = run_blocks(model, arch, arch.embed(model, ids), 0, n // 2)
    split = arch.head(model, arch.norm(model, run_blocks(model, arch, h, n // 2, n)))
    noise.within(f"{name} adapter logits split at {n // 2}", noise.rel_max(split, ref), floor, K)


def test_an_unknown_model_has_no_adapter():
    class Phi:  # stands in for a module outside mlx_lm.models' supported set
        pass

    assert arch_of(Phi()) is None
