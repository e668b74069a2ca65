"""measure_fuse on real fuses of the tiny Llama: a healthy fuse passes fuse_exactness, and each fuse fault
planted with the plant_fault fixture (the adapter dropped, an untouched tensor scaled) fails it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from finetune.config.schema import GatesConfig
from finetune.export.fuse import fuse
from finetune.export.fuse_check import measure_fuse
from finetune.gates.fuse import fuse_exactness
from finetune.models.safetensors import load_file

MAX_REL = GatesConfig().fuse_max_rel


def _fused(tiny_hf, adapter, out, dtype: str | None = "float32"):
    """fuse() as the pipeline's fuse stage calls it."""
    fuse(tiny_hf, adapter, out, dtype=dtype)
    return out


@pytest.fixture(scope="module")
def healthy(tiny_hf, tiny_adapter, tmp_path_factory):
    return _fused(tiny_hf, tiny_adapter, tmp_path_factory.mktemp("healthy") / "fused")


def test_a_healthy_fuse_is_exactly_base_plus_delta(tiny_hf, tiny_adapter, healthy):
    m = measure_fuse(tiny_hf, tiny_adapter, healthy)
    adapter = load_file(tiny_adapter / "adapters.safetensors")
    assert sorted(m.adapted) == sorted(
        {k.rsplit(".", 1)[0] for k in adapter}
    )  # every adapted module measured
    assert all(d > 0 for d in m.deltas.values())
    assert m.untouched_changed == [] and m.missing == [] and m.untouched_total > 0
    v = fuse_exactness(m, max_rel=MAX_REL)
    assert v.passed and v.measured < MAX_REL, v.detail


def test_a_fuse_that_drops_the_adapter_fails(tiny_hf, tiny_adapter, tmp_path, plant_fault):
    plant_fault("fuse_drops_adapter")
    out = _fused(tiny_hf, tiny_adapter, tmp_path / "fused")
    m = measure_fuse(tiny_hf, tiny_adapter, out)
    assert min(m.adapted.values()) == pytest.approx(1.0, rel=1e-3)  # the whole delta is missing
    v = fuse_exactness(m, max_rel=MAX_REL)
    assert not v.passed and f"{len(m.adapted)} adapted weights are not base + delta" in v.detail


def test_a_fuse_that_scales_an_untouched_tensor_fails(tiny_hf, tiny_adapter, tmp_path, plant_fault):
    plant_fault("fuse_scales_tensor")
    out = _fused(tiny_hf, tiny_adapter, tmp_path / "fused")
    m = measure_fuse(tiny_hf, tiny_adapter, out)
    assert len(m.untouched_changed) == 1 and m.untouched_changed[0].endswith("norm.weight")
    assert max(m.adapted.values()) < MAX_REL  # the adapter itself was fused right
    v = fuse_exactness(m, max_rel=MAX_REL)
    assert not v.passed and "1 untouched tensors changed" in v.detail


def test_a_fuse_rounded_to_bfloat16_is_not_exact(tiny_hf, tiny_adapter, tmp_path):
    # why the pipeline fuses in float32: bf16 rounds every weight, small LoRA deltas included
    out = _fused(tiny_hf, tiny_adapter, tmp_path / "fused", dtype="bfloat16")
    v = fuse_exactness(measure_fuse(tiny_hf, tiny_adapter, out), max_rel=MAX_REL)
    assert not v.passed and "untouched tensors changed" in v.detail


def test_the_adapter_scale_is_read_from_the_saved_config(tiny_hf, tiny_adapter, healthy, tmp_path):
    # the same tensors with another scale in adapter_config.json describe another delta
    other = tmp_path / "other-scale"
    other.mkdir()
    (other / "adapters.safetensors").write_bytes((tiny_adapter / "adapters.safetensors").read_bytes())
    cfg = json.loads((tiny_adapter / "adapter_config.json").read_text())
    cfg["lora_parameters"]["scale"] *= 2
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    m = measure_fuse(tiny_hf, other, healthy)
    assert np.allclose(list(m.adapted.values()), 0.5, rtol=1e-3)  # half of the doubled delta is missing
    assert not fuse_exactness(m, max_rel=MAX_REL).passed


def test_a_fused_folder_with_another_tensor_set_fails(tiny_hf, tiny_adapter, healthy, tmp_path):
    from safetensors.numpy import save_file

    out = tmp_path / "fused"
    shutil.copytree(healthy, out)

    weights = load_file(out / "model.safetensors")
    extra = {**weights, "lm_head.weight": weights["model.embed_tokens.weight"].copy()}
    save_file(extra, str(out / "model.safetensors"), metadata={"format": "mlx"})
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    m = measure_fuse(tiny_hf, tiny_adapter, out)
    assert m.missing == ["lm_head.weight"]
    assert not fuse_exactness(m, max_rel=MAX_REL).passed


def test_config_changes_name_every_key_but_the_dtype():
    from finetune.export.fuse_check import config_changes

    base = {"rope_theta": 10000.0, "max_position_embeddings": 8192, "torch_dtype": "bfloat16"}
    assert config_changes(base, base | {"torch_dtype": "float32"}) == []
    assert config_changes(base, base | {"rope_theta": 1.0, "sliding_window": 4}) == [
        "config.json rope_theta: base 10000.0, fused 1.0",
        "config.json sliding_window: base None, fused 4",
    ]


def test_a_fuse_that_changes_the_config_is_named_by_config_changes(
    tiny_hf, tiny_adapter, tmp_path, plant_fault
):
    from finetune.export.fuse_check import config_changes

    plant_fault("fuse_config_drift")
    out = _fused(tiny_hf, tiny_adapter, tmp_path / "fused")
    base, fused = (json.loads((d / "config.json").read_text()) for d in (tiny_hf, out))
    assert fused["rms_norm_eps"] == pytest.approx(10 * base["rms_norm_eps"])
    assert config_changes(base, fused) == [
        f"config.json rms_norm_eps: base {base['rms_norm_eps']!r}, fused {fused['rms_norm_eps']!r}"
    ]
