"""finetune.export.peft_adapter: the mlx-lm adapter as PEFT loads it, measured against MLX on the tiny Llama."""

from __future__ import annotations

import json

import numpy as np
import pytest

from finetune.export.fuse import FuseError
from finetune.export.peft_adapter import PEFT_CONFIG, PEFT_WEIGHTS, export_peft
from tests.unit.export.conftest import LORA


def test_the_export_is_peft_layout_with_alpha_scale_times_rank(tiny_hf, tiny_adapter, tmp_path):
    from safetensors.numpy import load_file

    config = export_peft(tiny_adapter, tiny_hf, tmp_path / "peft", base_name="tiny-llama")
    assert json.loads((tmp_path / "peft" / PEFT_CONFIG).read_text()) == config
    assert (config["r"], config["lora_alpha"], config["fan_in_fan_out"]) == (4, LORA["scale"] * 4, False)
    assert (config["layers_to_transform"], config["layers_pattern"]) == ([0, 1], ["layers"])
    assert config["target_modules"] == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    mlx, peft = (
        load_file(str(tiny_adapter / "adapters.safetensors")),
        load_file(str(tmp_path / "peft" / PEFT_WEIGHTS)),
    )
    key = next(k for k in mlx if k.endswith("q_proj.lora_a"))
    module = key.removesuffix(".lora_a")
    np.testing.assert_array_equal(peft[f"base_model.model.{module}.lora_A.weight"], mlx[key].T)
    np.testing.assert_array_equal(peft[f"base_model.model.{module}.lora_B.weight"], mlx[f"{module}.lora_b"].T)


def test_a_dora_adapter_has_no_peft_lora_form(tiny_hf, make_adapter, tmp_path):
    adapter = make_adapter(tiny_hf, tmp_path / "dora", kind="dora")
    with pytest.raises(FuseError, match="a dora adapter has no PEFT LoRA form"):
        export_peft(adapter, tiny_hf, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_the_planted_fault_writes_alpha_as_r(tiny_hf, tiny_adapter, tmp_path, plant_fault):
    plant_fault("peft_alpha_missing")
    assert export_peft(tiny_adapter, tiny_hf, tmp_path / "peft")["lora_alpha"] == 4.0
