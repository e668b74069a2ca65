"""finetune.export.gguf_lora: llama.cpp's converter turns the PEFT form into a GGUF LoRA carrying alpha."""

from __future__ import annotations

from finetune.export.gguf_inspect import inspect_gguf
from finetune.export.gguf_lora import ALPHA_KEY, export_gguf_lora
from finetune.export.peft_adapter import export_peft
from tests.unit.export.conftest import LORA


def test_the_gguf_lora_carries_the_adapters_alpha_and_every_tensor(tiny_hf, tiny_adapter, tmp_path):
    export_peft(tiny_adapter, tiny_hf, tmp_path / "peft")
    info = inspect_gguf(export_gguf_lora(tmp_path / "peft", tiny_hf, tmp_path / "adapter.gguf"))
    assert info.metadata[ALPHA_KEY] == LORA["scale"] * LORA["rank"]
    assert len(info.tensors) == 2 * 7 * 2  # A and B of 7 projections in 2 blocks


def test_the_planted_fault_writes_alpha_as_r(tiny_hf, tiny_adapter, tmp_path, plant_fault):
    export_peft(tiny_adapter, tiny_hf, tmp_path / "peft")
    plant_fault("gguf_lora_alpha_missing")
    info = inspect_gguf(export_gguf_lora(tmp_path / "peft", tiny_hf, tmp_path / "adapter.gguf"))
    assert info.metadata[ALPHA_KEY] == LORA["rank"]
