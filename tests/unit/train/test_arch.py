"""Every architecture adapter computes exactly what the model itself computes, whole and split at any block."""

from __future__ import annotations

import mlx.core as mx
import pytest

from finetune.train.arch import ARCHS, arch_logits, arch_of, run_blocks
from tests.unit.train.test_shortcuts import CONFIGS, build


@pytest.mark.parametrize("name", list(CONFIGS))
def test_adapter_logits_equal_the_models_whole_and_split(name):
    model = build(name)
    arch = arch_of(model)
    assert arch is ARCHS[CONFIGS[name]["model_type"]]
    ids = mx.array([[(5 * i + 2) % 300 + 1 for i in range(20)]], dtype=mx.int32)
    ref = model(ids)
    assert mx.allclose(arch_logits(model, arch, ids), ref, atol=1e-5).item()
    n = len(arch.blocks(model))
    h = run_blocks(model, arch, arch.embed(model, ids), 0, n // 2)
    split = arch.head(model, arch.norm(model, run_blocks(model, arch, h, n // 2, n)))
    assert mx.allclose(split, ref, atol=1e-5).item()


def test_an_unknown_model_has_no_adapter():
    class Phi:  # stands in for a module outside mlx_lm.models' supported set
        pass

    assert arch_of(Phi()) is None
