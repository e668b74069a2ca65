"""A fused folder keeps the base's HF layout: mlx-lm's GPT-2 layout is rewritten back, and the guard sees drift."""

from __future__ import annotations

import shutil

from finetune.export.layout import same_layout, tensor_shapes, to_base_layout


def _mlx_saved(base, out):
    from mlx_lm.utils import load, save

    model, tokenizer, config = load(str(base), return_config=True)
    save(out, str(base), model, tokenizer, config, donate_model=False)
    return out


def test_an_mlx_saved_gpt2_is_rewritten_to_the_hub_layout(tmp_path):
    from finetune.models.cache import cache_root
    from finetune.models.tiny import build_tiny_gpt2

    base = build_tiny_gpt2(cache_root() / "models")
    fused = _mlx_saved(base, tmp_path / "fused")
    drift = same_layout(base, fused)
    assert any("model.h.0.attn.c_attn.weight extra" in p for p in drift)
    assert to_base_layout(fused, base) is True
    assert same_layout(base, fused) == []
    assert tensor_shapes(fused)["h.0.attn.c_attn.weight"] == (64, 192)  # Conv1D (in, out) again
    assert to_base_layout(fused, base) is False, "a second call has nothing to do"


def test_a_llama_saved_by_mlx_lm_already_has_the_base_layout(tiny_hf, tmp_path):
    fused = _mlx_saved(tiny_hf, tmp_path / "fused")
    assert to_base_layout(fused, tiny_hf) is False and same_layout(tiny_hf, fused) == []


def test_the_guard_reports_missing_extra_and_reshaped_tensors(tiny_hf, tmp_path):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    other = tmp_path / "other"
    shutil.copytree(tiny_hf, other)
    w = load_file(str(other / "model.safetensors"))
    w.pop("model.norm.weight")
    w["model.extra.weight"] = np.zeros(3, np.float32)
    w["model.layers.0.input_layernorm.weight"] = np.zeros(3, np.float32)
    save_file(w, str(other / "model.safetensors"))
    problems = "\n".join(same_layout(tiny_hf, other))
    assert "model.norm.weight missing" in problems and "model.extra.weight extra" in problems
    assert "model.layers.0.input_layernorm.weight: (64,) in the base, (3,) fused" in problems
